"""Benchmark (not a test): quantize the demo model with ours and with GPTQModel on this machine.

Same settings (bits 4, group 128, sym, damp 0.01) and the SAME calibration token ids for every
method; each method runs in a fresh subprocess that measures quantize seconds, peak RSS and
perplexity on held-out English Wikipedia summaries (GPTQ convention: concatenate, tokenize once,
non-overlapping windows, exp(mean NLL)). Writes <out>/quantize-demo-cpu.json and, from it, .md.

    .venv/bin/python experiments/bench_quantize_demo.py            # ~20 min on 2 cores
    .venv/bin/python experiments/bench_quantize_demo.py --quick    # tiny settings, checks the plumbing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (who quantizes, settings beyond the shared ones, what the row means)
METHODS = {
    "fp": ("none", {}, "the demo model's fp32 weights (reference)"),
    "rtn": ("ours", {"method": "rtn", "mse": False}, "round-to-nearest, same format"),
    "gptq": ("ours", "defaults", "our GPTQ at qwen-quantize's defaults"),
    "gptqmodel-same": ("gptqmodel", {"desc_act": True, "static_groups": True, "mse": 2.4, "act_group_aware": False},
                       "GPTQModel at our default settings (act-order, static groups, mse norm 2.4)"),
    "gptqmodel": ("gptqmodel", {"act_group_aware": False}, "GPTQModel, plain GPTQ (act_group_aware off)"),
    "gptq-minmax": ("ours", {"mse": False, "desc_act": False, "static_groups": False}, "our GPTQ, min-max scales"),
    "gptq-mse": ("ours", {"mse": True, "desc_act": False, "static_groups": False}, "our GPTQ, range search (mse)"),
    "gptq-act": ("ours", {"mse": False, "desc_act": True, "static_groups": False}, "our GPTQ, act-order"),
    "gptq-act-mse": ("ours", {"mse": True, "desc_act": True, "static_groups": False}, "our GPTQ, act-order + mse"),
    "gptq-act-static": ("ours", {"mse": False, "desc_act": True, "static_groups": True},
                        "our GPTQ, act-order with static groups (g_idx stays in order)"),
    "gptq-act-static-mse": ("ours", {"mse": True, "desc_act": True, "static_groups": True},
                            "our GPTQ, act-order with static groups + mse"),
    "gptqmodel-gar": ("gptqmodel", {"act_group_aware": True}, "GPTQModel, its default group-aware reordering"),
    "gptq-gptaq": ("ours", "defaults+gptaq", "our GPTQ at its defaults + asymmetric calibration (--gptaq 0.25)"),
    "gptqmodel-gptaq": ("gptqmodel", {"desc_act": True, "static_groups": True, "mse": 2.4, "act_group_aware": False,
                                      "gptaq": {"alpha": 0.25}},
                        "GPTQModel at our default settings + its GPTAQ (alpha 0.25)"),
}
DEFAULT_METHODS = ("fp", "rtn", "gptq", "gptqmodel-same", "gptqmodel", "gptq-minmax", "gptq-mse", "gptq-act", "gptq-act-mse",
                   "gptq-act-static", "gptq-act-static-mse", "gptqmodel-gar")  # most important first
SHARED = {"bits": 4, "group_size": 128, "sym": True, "damp": 0.01}


# ---------------------------------------------------------------- shared inputs (built once)

def prepare_inputs(work: Path, nsamples: int, seqlen: int, eval_windows: int) -> dict:
    """Calibration ids and evaluation windows, saved so every worker uses the same tokens."""
    import torch

    from qwen_quant.quantize.calibration import build_calibration
    from qwen_quant.corpora import wiki_texts
    from qwen_quant.models.load import load_model

    loaded = load_model("demo")
    calib = build_calibration(loaded, nsamples=nsamples, seqlen=seqlen, seed=0)
    corpus = wiki_texts("eval")
    ids = loaded.tokenizer("\n\n".join(corpus.texts), return_tensors="pt").input_ids[0]
    n = min(eval_windows, ids.numel() // seqlen)
    windows = ids[: n * seqlen].reshape(n, seqlen)
    torch.save({"input_ids": calib.input_ids, "attention_mask": calib.attention_mask, "windows": windows},
               work / "inputs.pt")
    return {"calibration": calib.description,
            "eval": {**corpus.description, "seqlen": seqlen, "windows": n, "tokens": n * seqlen,
                     "corpus_tokens": int(ids.numel()), "slice": f"first {n} windows"}}


# ---------------------------------------------------------------- worker side (one method per process)

def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def cpu_seconds() -> float:
    """User + system time of this process, all threads: less sensitive than wall time to a busy box."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def perplexity(model, windows, batch: int = 4) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch):
            ids = windows[s:s + batch]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def our_defaults() -> dict:
    """qwen-quantize's default algorithm settings (from the API signature: the CLI shares them)."""
    import inspect

    from qwen_quant.quantize.api import quantize

    params = inspect.signature(quantize).parameters
    return {k: params[k].default for k in ("desc_act", "static_groups", "mse", "forward_dtype")}


def quantize_ours(model, data, extra: dict) -> None:
    """Our block-by-block GPTQ in memory: the pipeline's own steps, weights replaced in place."""
    from qwen_quant.quantize import pipeline
    from qwen_quant.quantize.calibration import Calibration
    from qwen_quant.models.layouts import layout_for

    settings = pipeline.QuantSettings(**{**SHARED, **extra})
    print(f"[bench] our settings: {settings}", flush=True)
    source = pipeline.InMemoryModel(model, layout_for(model))
    calib = Calibration(data["input_ids"], data["attention_mask"], {})
    inputs = pipeline.capture_block_inputs(source, calib, "cpu")
    inputs.autocast = pipeline.forward_autocast(settings, source.dtype, "cpu")
    pipeline.start_fp_stream(inputs, settings)
    for i in range(len(source.blocks)):
        pipeline.quantize_and_propagate(source.load_block(i, "cpu"), inputs, source.layout, settings)


def quantize_gptqmodel(work: Path, extra: dict, out: Path) -> float:
    """GPTQModel 7.6.0 on the demo HF folder, in the peer's own environment (.venv-peer, `make peer`) through
    experiments/gptqmodel_peer.py, on the same token ids (work/inputs.pt); returns its quantize() seconds."""
    from qwen_quant.models.demo import demo_model_dir

    peer = REPO / ".venv-peer" / "bin" / "python"
    if not peer.is_file():
        raise SystemExit(f"{peer} is missing: run `make peer` first")
    settings = {"group_size": SHARED["group_size"], "desc_act": False, "damp_percent": SHARED["damp"],
                "sym": SHARED["sym"], **extra}
    proc = subprocess.run([str(peer), str(REPO / "experiments" / "gptqmodel_peer.py"), "quantize",
                           str(demo_model_dir()), str(work / "inputs.pt"), str(out), json.dumps(settings)],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={"PATH": os.environ.get("PATH", ""), "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"GPTQModel failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def load_checkpoint_into(model, folder: Path) -> None:
    """Dequantize a GPTQ checkpoint's linears (our format reader) into an fp32 model of that shape."""
    import torch
    from safetensors.torch import load_file

    from qwen_quant.kernels.format import QuantConfig, dequantize
    from qwen_quant.models.layouts import layout_for

    qcfg = QuantConfig.from_dict(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    layout = layout_for(model)
    for i in range(len(model.get_submodule(layout.blocks))):
        for name in layout.linear_names:
            p = f"{layout.blocks}.{i}.{name}."
            lin = model.get_submodule(p[:-1])
            w = dequantize(tensors[p + "qweight"], tensors[p + "qzeros"], tensors[p + "scales"], tensors[p + "g_idx"],
                           qcfg.bits, lin.in_features, v1=qcfg.v1, dtype=torch.float32)
            lin.weight.data.copy_(w)


def run_worker(name: str, work: Path, threads: int) -> None:
    import torch

    from qwen_quant.models.load import load_model

    torch.set_num_threads(threads)
    who, extra, _ = METHODS[name]
    if extra == "defaults":
        extra = our_defaults()
    elif extra == "defaults+gptaq":
        extra = our_defaults() | {"gptaq_alpha": 0.25}
    data = torch.load(work / "inputs.pt")
    model = load_model("demo").model
    seconds = cpu = None
    cpu0 = cpu_seconds()
    if who == "ours":
        t0 = time.perf_counter()
        quantize_ours(model, data, extra)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    elif who == "gptqmodel":
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = quantize_gptqmodel(work, extra, work / f"{name}-ckpt")
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the peer's process, its model load and save included: an upper bound
        cpu = (child.ru_utime + child.ru_stime) - (child0.ru_utime + child0.ru_stime)
        load_checkpoint_into(model, work / f"{name}-ckpt")
    rss_after_quantize = peak_rss_gib()
    ppl = perplexity(model, data["windows"])
    result = {"method": name, "quantizer": who, "settings": {**SHARED, **extra} if who != "none" else None,
              "seconds": seconds, "cpu_seconds": cpu, "load_average": os.getloadavg(), "peak_rss_gib_quantize": rss_after_quantize,
              "peak_rss_gib_total": peak_rss_gib(), "ppl": ppl}
    (work / f"{name}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- driver

def provenance(argv: list[str]) -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from qwen_quant.provenance import git_commit

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "gptqmodel": version("gptqmodel"),
            "git_commit": git_commit(),  # '+dirty' with uncommitted changes (earlier JSON: "(uncommitted changes)")
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["experiments/bench_quantize_demo.py", *argv])}


def goals(rows: dict) -> list[dict]:
    """The issue's goals, checked against the measured rows (None when a row is missing)."""
    def get(m, key):
        return rows.get(m, {}).get(key)

    # the peer at the same settings as our defaults when it was measured, else its plain GPTQ
    peer_name = "gptqmodel-same" if "gptqmodel-same" in rows else "gptqmodel"
    fp, rtn, ours = get("fp", "ppl"), get("rtn", "ppl"), get("gptq", "ppl")
    out = []
    if None not in (fp, rtn, ours):
        ratio = (ours - fp) / (rtn - fp)
        out.append({"goal": "our GPTQ ppl increase over fp <= 0.7 x RTN's", "value": round(ratio, 3), "met": ratio <= 0.7})
    # ours against the peer, for plain GPTQ and (when both rows were measured) for GPTAQ
    for what, mine, theirs in (("GPTQ", "gptq", peer_name), ("GPTAQ", "gptq-gptaq", "gptqmodel-gptaq")):
        peer_label = f"GPTQModel's{' GPTAQ' if what == 'GPTAQ' else ''} ({theirs})"
        p_ours, p_peer = get(mine, "ppl"), get(theirs, "ppl")
        if None not in (p_ours, p_peer):
            out.append({"goal": f"our {what} ppl <= {peer_label} x 1.01", "value": round(p_ours / p_peer, 4),
                        "met": p_ours / p_peer <= 1.01})
        t_ours, t_peer = get(mine, "seconds"), get(theirs, "seconds")
        if None not in (t_ours, t_peer):
            time_what = "" if what == "GPTQ" else "GPTAQ "
            out.append({"goal": f"our {time_what}quantize time <= {peer_label}", "value": round(t_ours / t_peer, 3),
                        "met": t_ours <= t_peer})
    return out


def render_markdown(report: dict) -> str:
    p, rows = report["provenance"], report["results"]
    fp = rows.get("fp", {}).get("ppl")
    rtn_gap = rows["rtn"]["ppl"] - fp if fp is not None and "rtn" in rows else None
    lines = [
        "# Quantizing the demo model on the CPU: ours vs GPTQModel",
        "",
        f"Model: {report['model']}. Settings shared by every quantizer: bits {SHARED['bits']}, group size "
        f"{SHARED['group_size']}, sym, damp {SHARED['damp']}, the same {report['calibration']['nsamples']} calibration "
        f"samples x {report['calibration']['seqlen']} tokens ({report['calibration'].get('mix', report['calibration']['source'])}, "
        "calib split).",
        f"Perplexity: {report['eval']['corpus']} ({report['eval']['package']} {report['eval']['version']}, split "
        f"{report['eval']['split']}), {report['eval']['slice']} of {report['eval']['seqlen']} tokens "
        f"({report['eval']['tokens']} tokens), GPTQ convention, fp32 activations. Not a WikiText-2 number.",
        "Seconds: quantization only (ours: block capture + GPTQ + propagation in memory; GPTQModel: its "
        "`quantize()` call). Peak RSS: max resident set of a fresh process up to the end of quantization.",
        "",
        "CPU seconds: user+system time of the worker process over quantization (GPTQModel's also covers its "
        "load and save). Load average: the machine's 1-minute load when the method finished (2 cores; above 2 "
        "means other work shared the CPU and wall seconds are inflated).",
        "",
        "| method | what | seconds | CPU seconds | load avg | peak RSS (GiB) | ppl | ppl increase / RTN's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        cpu = "-" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.1f}"
        gap = "-" if rtn_gap in (None, 0) or name == "fp" else f"{(r['ppl'] - fp) / rtn_gap:.3f}"
        what = METHODS[name][2]
        if METHODS[name][1] == "defaults":
            what += ": " + ", ".join(f"{k} {r['settings'][k]}" for k in ("desc_act", "static_groups", "mse", "forward_dtype"))
        lines.append(f"| {name} | {what} | {secs} | {cpu} | {r['load_average'][0]:.1f} | {r['peak_rss_gib_quantize']:.2f} | {r['ppl']:.4f} | {gap} |")
    missing = [m for m in report.get("methods_requested", []) if m not in rows]
    if missing:
        lines += ["", f"Not (yet) measured in this run: {', '.join(missing)}."]
    lines += ["", "## Goals", ""]
    for g in report["goals"]:
        lines.append(f"- {g['goal']}: {g['value']} -> {'met' if g['met'] else 'NOT met'}")
    lines += ["", "## Provenance", ""]
    lines += [f"- {k}: {v}" for k, v in p.items()]
    lines += ["", "Generated from quantize-demo-cpu.json by experiments/bench_quantize_demo.py.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(REPO / "reports"))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="4 samples x 128 tokens, 2 windows: checks the plumbing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args.worker, Path(args.work_dir), args.threads)
        return 0
    if args.quick:
        args.nsamples, args.seqlen, args.eval_windows = 4, 128, 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quantize-demo-cpu" if not args.quick else "quantize-demo-cpu-quick"
    from qwen_quant.models.load import load_model

    model_source = load_model("demo").description["source"]

    from qwen_quant.files import write_text_atomic

    started = provenance(argv)  # read once, at the start: a commit made while it runs did not make its numbers

    def publish(described, rows):
        """Rewrite JSON, then Markdown from it, after every method: a long run reports as it goes."""
        report = {"model": model_source, **described, "methods_requested": methods,
                  "results": rows, "goals": goals(rows), "provenance": started}
        write_text_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(out_dir / f"{stem}.md", render_markdown(json.loads((out_dir / f"{stem}.json").read_text())))

    with tempfile.TemporaryDirectory(prefix="bench-quantize-demo-") as tmp:
        work = Path(tmp)
        described = prepare_inputs(work, args.nsamples, args.seqlen, args.eval_windows)
        rows = {}
        for name in methods:
            print(f"[bench] {name} ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work-dir", str(work),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=tempfile.gettempdir())  # not the repo root: profile/ shadows stdlib
            if proc.returncode != 0 or not (work / f"{name}.json").exists():
                print(f"[bench] {name} FAILED (exit {proc.returncode})", flush=True)
                continue
            rows[name] = json.loads((work / f"{name}.json").read_text())
            print(f"[bench] {name}: {rows[name]}", flush=True)
            publish(described, rows)
    print((out_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
