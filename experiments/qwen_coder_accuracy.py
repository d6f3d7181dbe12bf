#!/usr/bin/env python
"""The accuracy table of a real Qwen on the CPU (issue 15): Qwen2.5-Coder-1.5B-Instruct, fp against Int4.

Rows: fp (the GGUF's Q4_K_M weights dequantized: the only copy that ships offline), RTN, our GPTQ at
qwen-quantize's defaults, GPTQModel 7.6.0 at identical settings on identical calibration tokens (in its own
environment, .venv-peer; it has nothing like --rtn-massive, so GPTQ runs in every layer there), and any extra
recipe named with --extra. Columns: perplexity on the five held-out
domains (32 windows of 512 tokens each), MMLU 0-shot (round robin over the 57 subjects), ARC-Challenge, and
HumanEval pass@1 where its measured per-problem cost fits (--humaneval N problems).

Every step only calls our CLIs (qwen-quantize, qwen-eval, qwen-report) or the peer's script, and resumes:
checkpoints that exist are kept, qwen-eval's item store keeps every scored item, so the same command after a
stop (or with a larger --limit) scores only what is missing. The work folder does not outlive a session's
machine; the committed comparison.json does, with every row's per-item lists: `render` keeps its rows
(qwen-report --keep) and replaces only those evaluated again, so the table grows across sessions.

    python experiments/qwen_coder_accuracy.py quantize [ROWS]         # our default checkpoint, RTN, the peer's
    python experiments/qwen_coder_accuracy.py eval fp rtn gptq        # one row after the other (one thread each)
    python experiments/qwen_coder_accuracy.py eval fp gptq --only humaneval   # a column added to kept rows
    python experiments/qwen_coder_accuracy.py render                  # reports/qwen2.5-coder-1.5b-accuracy/
Calibration for every quantized row: CALIB (what a CPU user can afford), the same tokens for ours and the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # offline_qwen, beside this script
from offline_qwen import fp_folder, study_dir  # noqa: E402
REPORT = ROOT / "reports" / "qwen2.5-coder-1.5b-accuracy"
DOMAINS = "ppl-wiki,ppl-zh,ppl-code,ppl-fr,ppl-fiction"
CALIB = ["--nsamples", "16", "--seqlen", "512"]
# the `gptq` row (and the peer's, on its tokens) was measured at the defaults of 2026-12-06, whose mix had four
# sources: pinned, so the row's command stays the run it is. The defaults since (five sources, 2026-12-07) are the
# row `gptq-prose`, and the six-source recipe the row `six`, both named with --extra (DIAGNOSIS.md section 18)
FOUR_SOURCES = ["--calib", "wiki+peoples-daily+code+chat"]
ROWS = ("fp", "rtn", "gptq", "gptqmodel")
# items per benchmark, as the committed rows have them: MMLU 700 round robin over the 57 subjects, ARC-Challenge's
# whole test set, HumanEval's 164 problems (under DEFAULT_LIMIT); perplexity takes --ppl-windows instead
TASK_LIMITS = {"mmlu-0shot": 700, "arc-challenge": 1172}
DEFAULT_LIMIT = 600
FP_LABEL = "fp32"  # qwen-eval labels a model by its folder: fp_folder() is .../fp32


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(cmd: list[str], **kw) -> None:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=env, **kw).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")


def checkpoint(row: str) -> Path:
    return fp_folder() if row == "fp" else study_dir() / "accuracy-ckpt" / row


def quantize(rows: list[str], extra: dict[str, list[str]]) -> None:
    fp = fp_folder()
    ours = {"rtn": ["--method", "rtn", "--no-mse"], "gptq": FOUR_SOURCES} | extra
    for row, args in ours.items():
        if row in rows and not (checkpoint(row) / "quant_report.json").is_file():
            run([bin_("qwen-quantize"), str(fp), "--out", str(checkpoint(row)), "--quiet", *CALIB, *args])
    peer_out = checkpoint("gptqmodel")
    if "gptqmodel" in rows and not (peer_out / "peer_quantize.json").is_file():
        peer, c = peer_settings()
        calib = study_dir() / "accuracy-ckpt" / "calibration.pt"
        calib.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(ROOT / "experiments" / "gptqmodel_peer.py"), "export", str(fp), str(calib),
             "--calib", c["source"], "--nsamples", str(c["nsamples"]), "--seqlen", str(c["seqlen"]),
             "--seed", str(c["seed"])], cwd="/tmp")
        run([str(ROOT / ".venv-peer" / "bin" / "python"), str(ROOT / "experiments" / "gptqmodel_peer.py"), "quantize",
             str(fp), str(calib), str(peer_out), json.dumps(peer)], cwd="/tmp")


def peer_settings() -> tuple[dict, dict]:
    """GPTQModel's settings identical to our `gptq` row's, and the calibration both run on: read from our
    checkpoint's own record when it is there, else from the QuantSettings qwen-quantize would run with CALIB and
    the row's pinned mix (the same defaults, one place), so the peer's row does not wait on ours."""
    record = checkpoint("gptq") / "quant_report.json"
    if record.is_file():
        q = json.loads(record.read_text())
        qc, settings, c = q["quantization_config"], q["settings"], q["calibration"]
        if c["source"] == "default":  # a record from 2026-12-06, when the default mix was the four sources
            c = c | {"source": FOUR_SOURCES[1]}
    else:
        from qwen_quant.quantize.settings import QuantSettings

        s = QuantSettings(nsamples=int(CALIB[1]), seqlen=int(CALIB[3]), calib=FOUR_SOURCES[1])
        qc, settings = s.quantization_config(), s.run_settings()
        c = {"source": s.calib, "nsamples": s.nsamples, "seqlen": s.seqlen, "seed": s.seed}
    peer = {"bits": qc["bits"], "group_size": qc["group_size"], "sym": qc["sym"], "desc_act": qc["desc_act"],
            "static_groups": qc["static_groups"], "damp_percent": qc["damp_percent"],
            "mse": 2.4 if settings.get("mse") else 0.0}
    return peer, c


def evaluate(rows: list[str], limit: int | None, humaneval: int, only: str | None = None) -> None:
    """Every row on the table's tasks, each at the table's item count (TASK_LIMITS; --limit overrides it); `only`
    (a comma list) scores just those tasks, e.g. a column added in a later session: render keeps the row's other
    tasks from the committed table, so `only` must run on the same checkpoint as they did (a checkpoint made again
    is the same run only if it scores the same per-window NLLs)."""
    tasks = (only or f"{DOMAINS},mmlu-0shot,arc-challenge" + (",humaneval" if humaneval else "")).split(",")
    # one qwen-eval per run of tasks with the same item count, in the table's order (HumanEval, the slowest, last);
    # they share the row's --out and its item store, but each call writes its own results.json: the table is
    # rendered after each, so that it keeps every call's cells (render carries the committed ones)
    groups: list[tuple[int, list[str]]] = []
    for task in tasks:
        n = limit or TASK_LIMITS.get(task, DEFAULT_LIMIT)
        if groups and groups[-1][0] == n:
            groups[-1][1].append(task)
        else:
            groups.append((n, [task]))
    for row in rows:
        for n, group in groups:
            run([bin_("qwen-eval"), str(checkpoint(row)), "--tasks", ",".join(group), "--limit", str(n),
                 "--ppl-windows", "32", "--seqlen", "512", "--dtype", "bf16", "--batch", "8",
                 "--out", str(study_dir() / "accuracy" / row), "--quiet"])
            if len(groups) > 1:
                render([row])


def render(rows: list[str]) -> None:
    """The table from the rows evaluated here, on top of the committed table's (--keep): rows measured in an
    earlier session stay, with their per-item lists for the paired errors, after its work folder is gone."""
    present = [r for r in rows if (study_dir() / "accuracy" / r / "results.json").is_file()]
    earlier = REPORT / "comparison.json"
    kept = [m["label"] for m in json.loads(earlier.read_text())["models"]] if earlier.is_file() else []
    shown = set(present) | {"fp" if label == FP_LABEL else label for label in kept}
    run([bin_("qwen-report"), "--compare", *[str(study_dir() / "accuracy" / r) for r in present],
         *(["--keep", str(earlier)] if earlier.is_file() else []),
         *(["--baseline", "rtn"] if "rtn" in shown else []), "--out", str(REPORT),
         "--title", f"Qwen2.5-Coder-1.5B-Instruct: fp against Int4 g128 ({', '.join(r for r in dict.fromkeys([*ROWS, *(k for k in kept if k != FP_LABEL), *rows]) if r in shown and r != 'fp')}; "
                    f"missing so far: {', '.join(r for r in ROWS if r not in shown) or 'none'})"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["quantize", "eval", "render"])
    p.add_argument("rows", nargs="*", help=f"rows (default: {', '.join(ROWS)} and every --extra)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per benchmark for every task (default: the table's, MMLU 700, ARC-Challenge 1172)")
    p.add_argument("--humaneval", type=int, default=0, help="also HumanEval pass@1 (all 164 problems) when > 0")
    p.add_argument("--only", default=None, metavar="TASKS",
                   help="eval: score only these tasks (comma list, e.g. humaneval); the row's other tasks stay as the "
                        "committed table has them")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                   help="another quantized row: NAME='qwen-quantize arguments' (e.g. best='--damp 0.1')")
    args = p.parse_args(argv)
    extra = {k: v.split() for k, v in (e.split("=", 1) for e in args.extra)}
    args.rows = args.rows or [*ROWS, *extra]
    if args.step == "quantize":
        quantize(args.rows, extra)
    elif args.step == "eval":
        evaluate(args.rows, args.limit, args.humaneval, args.only)
    else:
        render(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
