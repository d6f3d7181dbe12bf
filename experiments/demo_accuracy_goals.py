#!/usr/bin/env python
"""Issue 6's accuracy goals on the demo model, measured on this machine and written with provenance.

fp / GPTQ Int4 (one or more checkpoints) / RTN Int4 through qwen-eval on the same items; then, per GPTQ
checkpoint:
- every perplexity corpus: GPTQ beats RTN, and (aim) GPTQ's increase over fp <= 0.7 x RTN's increase;
- every benchmark where fp is above chance (by more than 2 standard errors): |GPTQ - fp| <= 2 points,
  shown with the paired standard error of GPTQ - fp (the same items for every model).
Writes OUT/results.{json,md,csv} (qwen-eval's) and OUT/goals.{json,md} (the verdicts, from the JSON).

    .venv/bin/python experiments/demo_accuracy_goals.py --gptq out/demo/gptq-int4 --rtn out/demo/rtn-int4
    .venv/bin/python experiments/demo_accuracy_goals.py --gptq A --gptq B ...   # several GPTQ checkpoints
    .venv/bin/python experiments/demo_accuracy_goals.py --render                 # tables again from the JSON
Paths inside the repository are recorded relative to it (the run works from the repository root), so
the published JSON names no one's checkout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qwen_quant.accuracy.paired import interval95, interval_vs_goal
from qwen_quant.quantize.settings import OPT_IN_RUN_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
PPL_AIM = 0.7
POINTS = 2.0


def goals_for(by: dict, tasks: list[str], fp: str, gptq: str, rtn: str) -> dict:
    """The verdicts for one GPTQ checkpoint against fp and RTN."""
    from qwen_quant.accuracy.multiple_choice import paired_delta
    from qwen_quant.accuracy.tasks import TASKS

    out = {"perplexity": [], "benchmarks": []}
    for task in tasks:
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
            interval = interval95(g["value"] - f["value"], paired[1] if paired else None)
            out["benchmarks"].append({"task": task, "metric": metric, "n": f["n"], "chance": chance,
                                      "fp": f["value"], "fp_stderr": f["stderr"], "gptq": g["value"],
                                      "rtn": r["value"], "gptq_minus_fp": g["value"] - f["value"],
                                      "gptq_minus_fp_stderr": paired[1] if paired else None,
                                      "gptq_minus_fp_interval95": interval,
                                      "interval_vs_goal": interval_vs_goal(interval),
                                      "fp_above_chance": above,
                                      "within_2_points": abs(g["value"] - f["value"]) <= POINTS if above else None})
    out["all_met"] = all(p["gptq_beats_rtn"] for p in out["perplexity"]) and \
        all(b["within_2_points"] is not False for b in out["benchmarks"])
    out["ppl_aim_met"] = all(p["meets_aim"] for p in out["perplexity"])
    return out


def goals(report: dict, fp: str, gptqs: list[str], rtn: str) -> dict:
    by = {(r["model"], r["task"], r["metric"]): r for r in report["results"]}
    return {"per_gptq": {g: goals_for(by, report["tasks"], fp, g, rtn) for g in gptqs}}


def checkpoint_settings(path: str) -> dict:
    """What a checkpoint was quantized with, from its quant_report.json (stated next to the verdicts)."""
    report = json.loads((Path(path) / "quant_report.json").read_text())
    qc, calib = report["quantization_config"], report["calibration"]
    return {"path": str(path), "command": report.get("command"), "commit": report.get("git_commit"),
            "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
            "desc_act": qc.get("desc_act"), "static_groups": qc.get("static_groups"), "damp": qc.get("damp_percent"),
            "mse": report["settings"].get("mse"), "method": report["settings"].get("method"),
            "forward_dtype": report["settings"].get("forward_dtype"),
            # recorded only when on (earlier checkpoints predate them, off then)
            **{k: report["settings"].get(k, off) for k, off in OPT_IN_RUN_SETTINGS.items()},
            "calibration": f"{calib.get('nsamples')} x {calib.get('seqlen')} tokens ({calib.get('source')})"}


def _pm(err) -> str:
    return f" ± {err:.1f}" if err is not None else ""


def _interval(b: dict) -> str:
    i = b.get("gptq_minus_fp_interval95")
    return "n/a" if i is None else f"[{i[0]:+.1f}, {i[1]:+.1f}]"


def _yes(flag) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def markdown(g: dict, report: dict) -> str:
    env, labels = report["env"], g["models"]
    lines = ["# Demo model: accuracy goals (issue 6)", "",
             f"Models: fp = `{labels['fp']}`, GPTQ = " + ", ".join(f"`{x}`" for x in labels["gptq"]) +
             f", RTN = `{labels['rtn']}`; the same items for all. Full tables: [results.md](results.md).", "",
             "## Perplexity: GPTQ must beat RTN (aim: increase <= 0.7 x RTN's)", "",
             "| corpus | GPTQ checkpoint | fp | GPTQ Int4 | RTN Int4 | GPTQ increase / RTN increase | GPTQ < RTN | aim met |",
             "|---|---|---|---|---|---|---|---|"]
    for label, v in g["per_gptq"].items():
        for p in v["perplexity"]:
            ratio = f"{p['ratio']:.2f}" if p["ratio"] is not None else "n/a (RTN not worse than fp)"
            lines.append(f"| {p['task']} | `{label}` | {p['fp']:.3f} | {p['gptq']:.3f} | {p['rtn']:.3f} | {ratio} | "
                         f"{_yes(p['gptq_beats_rtn'])} | {'yes' if p['meets_aim'] else 'no'} |")
    lines += ["", "## Benchmarks: GPTQ within 2 points of fp where fp is above chance", "",
              "GPTQ - fp carries its paired standard error (per-item differences on the same items): a difference "
              "smaller than about two of them is not distinguishable from the luck of which items were drawn. "
              "The 95% interval (± 1.96 of them) says whether these items can decide the goal: an interval inside "
              f"±{POINTS:g} points meets it whatever the luck, one outside misses it, one across needs more items.", "",
              "| task | metric | n | chance | GPTQ checkpoint | fp | GPTQ Int4 | RTN Int4 | GPTQ - fp | "
              "95% interval | fp above chance | within 2 | interval vs ±2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, v in g["per_gptq"].items():
        for b in v["benchmarks"]:
            lines.append(f"| {b['task']} | {b['metric']} | {b['n']} | {b['chance']:.0f} | `{label}` | "
                         f"{b['fp']:.1f} ± {b['fp_stderr']:.1f} | {b['gptq']:.1f} | {b['rtn']:.1f} | "
                         f"{b['gptq_minus_fp']:+.1f}{_pm(b['gptq_minus_fp_stderr'])} | {_interval(b)} | "
                         f"{'yes' if b['fp_above_chance'] else 'no'} | {_yes(b['within_2_points'])} | "
                         f"{b.get('interval_vs_goal', 'n/a')} |")
    lines += ["", "## Verdicts", ""]
    for label, v in g["per_gptq"].items():
        lines.append(f"- `{label}`: all required goals met: **{'yes' if v['all_met'] else 'NO'}**; perplexity aim "
                     f"(<= {PPL_AIM}) met on every corpus: {'yes' if v['ppl_aim_met'] else 'no'}; "
                     f"benchmark intervals vs ±{POINTS:g}: " +
                     ", ".join(f"{sum(b.get('interval_vs_goal') == k for b in v['benchmarks'])} {k.split()[0]}"
                               for k in ("inside", "outside", "across (more items needed)")) +
                     f" (of {len(v['benchmarks'])}).")
    lines += ["", "Checkpoints (from their quant_report.json):", ""]
    for label, c in g["checkpoints"].items():
        lines.append(f"- `{label}`: `{c['command']}` — " + ", ".join(
            f"{k} {c[k]}" for k in ("method", "bits", "group_size", "sym", "desc_act", "static_groups", "mse",
                                    "damp", "calibration")) + f"; commit `{c['commit']}`")
    lines += ["", f"Command: `{env.get('command')}`; commit `{env.get('commit')}`; {env.get('date')}; CPU "
              f"`{env.get('cpu')}` x{env.get('cpu_count')}; torch {env.get('torch')}, transformers "
              f"{env.get('transformers')}.", ""]
    return "\n".join(lines)


def repo_relative(path: str) -> str:
    """`path` relative to the repository when it lies inside it (as recorded and as opened), else as given."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else path


def write_goals(report: dict, out: Path, gptq_paths: list[str], rtn_path: str, checkpoints: dict | None = None) -> str:
    """goals.json and goals.md from qwen-eval's report (the first model fp, the last RTN, GPTQ between).
    `checkpoints`: the settings recorded when the models were evaluated (default: read them now)."""
    from qwen_quant.files import write_text_atomic

    labels = [m["label"] for m in report["models"]]
    fp, gptqs, rtn = labels[0], labels[1:-1], labels[-1]
    g = goals(report, fp, gptqs, rtn)
    g["models"] = {"fp": fp, "gptq": gptqs, "rtn": rtn}
    g["checkpoints"] = checkpoints or {label: checkpoint_settings(path)
                                       for label, path in zip(gptqs + [rtn], gptq_paths + [rtn_path])}
    write_text_atomic(out / "goals.json", json.dumps(g, indent=1) + "\n")
    text = markdown(g, report)
    write_text_atomic(out / "goals.md", text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gptq", action="append", help="a GPTQ checkpoint (repeat for several; default "
                                                   "out/demo/gptq-int4)")
    p.add_argument("--rtn", default="out/demo/rtn-int4")
    p.add_argument("--tasks", default="ppl-wiki,ppl-zh,arc-easy,piqa,hellaswag")
    p.add_argument("--limit", type=int, default=300, help="items per benchmark")
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "reports/demo-accuracy"))
    p.add_argument("--render", action="store_true", help="only re-render results.{md,csv} and goals.{json,md} "
                                                         "from the results.json in --out")
    args = p.parse_args()
    out = Path(args.out).resolve()
    os.chdir(ROOT)
    from qwen_quant.accuracy.evaluate import write_results

    if args.render:
        report = json.loads((out / "results.json").read_text())
        specs = [m["spec"] for m in report["models"]]
        write_results(report, out)
        earlier = out / "goals.json"  # keep what was recorded at evaluation time: checkpoints may be rebuilt since
        recorded = json.loads(earlier.read_text()).get("checkpoints") if earlier.is_file() else None
        print(write_goals(report, out, specs[1:-1], specs[-1], recorded))
        return
    gptq_paths = [repo_relative(x) for x in args.gptq or ["out/demo/gptq-int4"]]
    rtn_path = repo_relative(args.rtn)
    os.environ.setdefault("QWEN_QUANT_QUIET", "1")
    from qwen_quant.accuracy.evaluate import evaluate

    argv = ["experiments/demo_accuracy_goals.py", *(a for x in gptq_paths for a in ("--gptq", x)), "--rtn", rtn_path,
            "--tasks", args.tasks, "--limit", str(args.limit), "--ppl-windows", str(args.ppl_windows),
            "--seqlen", str(args.seqlen)]
    report = evaluate(["demo", *gptq_paths, rtn_path], args.tasks, limit=args.limit, seqlen=args.seqlen,
                      ppl_windows=args.ppl_windows, out=out, argv=argv)
    print(write_goals(report, out, gptq_paths, rtn_path))


if __name__ == "__main__":
    main()
