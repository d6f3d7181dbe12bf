#!/usr/bin/env python
"""Issue 6's accuracy goals on the demo model, measured on this machine and written with provenance.

fp / GPTQ Int4 / RTN Int4 through qwen-eval on the same items; then:
- every perplexity corpus: GPTQ beats RTN, and (aim) GPTQ's increase over fp <= 0.7 x RTN's increase;
- every benchmark where fp is above chance (by more than 2 standard errors): |GPTQ - fp| <= 2 points.
Writes OUT/results.{json,md,csv} (qwen-eval's) and OUT/goals.{json,md} (the verdicts, from the JSON).

    .venv/bin/python scripts/demo_accuracy_goals.py --gptq out/demo/gptq-int4 --rtn out/demo/rtn-int4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PPL_AIM = 0.7
POINTS = 2.0


def goals(report: dict, fp: str, gptq: str, rtn: str) -> dict:
    from qwen_quant.profile.accuracy.multiple_choice import paired_delta
    from qwen_quant.profile.accuracy.tasks import TASKS

    by = {(r["model"], r["task"], r["metric"]): r for r in report["results"]}
    out = {"perplexity": [], "benchmarks": []}
    for task in report["tasks"]:
        if task.startswith("ppl"):
            f, g, r = (by[(m, task, "perplexity")]["value"] for m in (fp, gptq, rtn))
            ratio = (g - f) / (r - f) if r - f > 0 else None
            out["perplexity"].append({"task": task, "fp": f, "gptq": g, "rtn": r, "gptq_increase": g - f,
                                      "rtn_increase": r - f, "ratio": ratio, "gptq_beats_rtn": g < r,
                                      "meets_aim": ratio is not None and ratio <= PPL_AIM})
            continue
        for metric in ("accuracy", "accuracy_norm"):
            if (fp, task, metric) not in by:
                continue
            f, g, r = (by[(m, task, metric)] for m in (fp, gptq, rtn))
            chance = TASKS[task].chance or 0.0
            above = f["value"] - chance > 2 * (f["stderr"] or 0)
            paired = paired_delta(f["details"].get("per_item"), g["details"].get("per_item"))
            out["benchmarks"].append({"task": task, "metric": metric, "n": f["n"], "chance": chance,
                                      "fp": f["value"], "fp_stderr": f["stderr"], "gptq": g["value"],
                                      "rtn": r["value"], "gptq_minus_fp": g["value"] - f["value"],
                                      "gptq_minus_fp_stderr": paired[1] if paired else None,
                                      "fp_above_chance": above,
                                      "within_2_points": abs(g["value"] - f["value"]) <= POINTS if above else None})
    out["all_met"] = all(p["gptq_beats_rtn"] for p in out["perplexity"]) and \
        all(b["within_2_points"] is not False for b in out["benchmarks"])
    out["ppl_aim_met"] = all(p["meets_aim"] for p in out["perplexity"])
    return out


def checkpoint_settings(path: str) -> dict:
    """What a checkpoint was quantized with, from its quant_report.json (stated next to the verdicts)."""
    report = json.loads((Path(path) / "quant_report.json").read_text())
    qc, calib = report["quantization_config"], report["calibration"]
    return {"command": report.get("command"), "commit": report.get("git_commit"), "bits": qc.get("bits"),
            "group_size": qc.get("group_size"), "sym": qc.get("sym"), "desc_act": qc.get("desc_act"),
            "static_groups": qc.get("static_groups"), "damp": qc.get("damp_percent"),
            "mse": report["settings"].get("mse"), "method": report["settings"].get("method"),
            "calibration": f"{calib.get('nsamples')} x {calib.get('seqlen')} tokens ({calib.get('source')})"}


def _pm(err) -> str:
    return f" ± {err:.1f}" if err is not None else ""


def markdown(g: dict, report: dict, labels: dict) -> str:
    env = report["env"]
    lines = ["# Demo model: accuracy goals (issue 6)", "",
             f"Models: fp = `{labels['fp']}`, GPTQ = `{labels['gptq']}`, RTN = `{labels['rtn']}`; the same items for "
             f"all three. Full tables: [results.md](results.md).", "",
             "## Perplexity: GPTQ must beat RTN (aim: increase <= 0.7 x RTN's)", "",
             "| corpus | fp | GPTQ Int4 | RTN Int4 | GPTQ increase / RTN increase | GPTQ < RTN | aim met |",
             "|---|---|---|---|---|---|---|"]
    for p in g["perplexity"]:
        ratio = f"{p['ratio']:.2f}" if p["ratio"] is not None else "n/a (RTN not worse than fp)"
        lines.append(f"| {p['task']} | {p['fp']:.3f} | {p['gptq']:.3f} | {p['rtn']:.3f} | {ratio} | "
                     f"{'yes' if p['gptq_beats_rtn'] else 'NO'} | {'yes' if p['meets_aim'] else 'no'} |")
    lines += ["", "## Benchmarks: GPTQ within 2 points of fp where fp is above chance", "",
              "GPTQ - fp carries its paired standard error (per-item differences on the same items).", "",
              "| task | metric | n | chance | fp | GPTQ Int4 | RTN Int4 | GPTQ - fp | fp above chance | within 2 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in g["benchmarks"]:
        within = "n/a" if b["within_2_points"] is None else ("yes" if b["within_2_points"] else "NO")
        lines.append(f"| {b['task']} | {b['metric']} | {b['n']} | {b['chance']:.0f} | {b['fp']:.1f} ± {b['fp_stderr']:.1f} "
                     f"| {b['gptq']:.1f} | {b['rtn']:.1f} | {b['gptq_minus_fp']:+.1f}{_pm(b['gptq_minus_fp_stderr'])} | "
                     f"{'yes' if b['fp_above_chance'] else 'no'} | {within} |")
    lines += ["", "Checkpoints (from their quant_report.json):", ""]
    for role in ("gptq", "rtn"):
        c = g.get("checkpoints", {}).get(role)
        if c:
            lines.append(f"- {role.upper()}: `{c['command']}` — " + ", ".join(
                f"{k} {c[k]}" for k in ("method", "bits", "group_size", "sym", "desc_act", "static_groups", "mse",
                                        "damp", "calibration")) + f"; commit `{c['commit']}`")
    lines += ["", f"**All required goals met: {'yes' if g['all_met'] else 'NO'}**; perplexity aim (<= {PPL_AIM}) "
              f"met on every corpus: {'yes' if g['ppl_aim_met'] else 'no'}.", "",
              f"Command: `{env.get('command')}`; commit `{env.get('commit')}`; {env.get('date')}; CPU `{env.get('cpu')}` "
              f"x{env.get('cpu_count')}; torch {env.get('torch')}, transformers {env.get('transformers')}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gptq", default=str(ROOT / "out/demo/gptq-int4"))
    p.add_argument("--rtn", default=str(ROOT / "out/demo/rtn-int4"))
    p.add_argument("--tasks", default="ppl-wiki,ppl-zh,arc-easy,piqa,hellaswag")
    p.add_argument("--limit", type=int, default=300, help="items per benchmark")
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "reports/demo-accuracy"))
    args = p.parse_args()
    os.environ.setdefault("QWEN_QUANT_QUIET", "1")
    from qwen_quant.profile.evaluate import evaluate
    from qwen_quant.files import write_text_atomic

    out = Path(args.out)
    report = evaluate(["demo", args.gptq, args.rtn], args.tasks, limit=args.limit, seqlen=args.seqlen,
                      ppl_windows=args.ppl_windows, out=out,
                      argv=["scripts/demo_accuracy_goals.py", *sys.argv[1:]])
    fp, gptq, rtn = (m["label"] for m in report["models"])
    g = goals(report, fp, gptq, rtn)
    g["models"] = {"fp": fp, "gptq": gptq, "rtn": rtn}
    g["checkpoints"] = {"gptq": checkpoint_settings(args.gptq), "rtn": checkpoint_settings(args.rtn)}
    write_text_atomic(out / "goals.json", json.dumps(g, indent=1) + "\n")
    text = markdown(g, report, g["models"])
    write_text_atomic(out / "goals.md", text)
    print(text)


if __name__ == "__main__":
    main()
