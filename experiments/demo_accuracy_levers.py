#!/usr/bin/env python
"""What moves the demo model's Int4 accuracy: quantization settings changed one at a time, each checkpoint
scored against fp on the same items.

Every lever is a folder LEVERS/<name>/ holding qwen-eval's results*.json for one checkpoint and that
checkpoint's quant_report.json (copied beside it, so the settings and commands travel with the numbers).
`run` makes one (quantize the demo model, evaluate it, copy the report); `render` (the default) reads them all,
plus the reference runs of experiments/demo_accuracy_goals.py (fp and the default checkpoints on the same items),
and writes LEVERS/levers.{json,md}: every metric, its difference from fp and the paired standard error.

    .venv/bin/python experiments/demo_accuracy_levers.py run damp10 --damp 0.1      # extra args go to qwen-quantize
    .venv/bin/python experiments/demo_accuracy_levers.py run g32-asym --group-size 32 --asym --tasks hellaswag,ppl-wiki
    .venv/bin/python experiments/demo_accuracy_levers.py                              # levers.{json,md} from the JSON
Run from anywhere; paths are recorded relative to the repository root.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_accuracy_goals import OPT_IN_RUN_SETTINGS, checkpoint_settings  # noqa: E402

REFERENCE = "reports/demo-accuracy"
# runs of experiments/demo_accuracy_goals.py whose fp results the levers are paired with
REFERENCES = (REFERENCE, "reports/demo-accuracy-hellaswag-1000", "reports/demo-accuracy-arc-piqa-1000")
LEVERS = "reports/demo-accuracy/levers"
BASE_ARGS = ["--nsamples", "32", "--seqlen", "512"]  # the make-demo checkpoint's calibration
# the settings a row's 'changed' column names when they differ from the first GPTQ row (make demo's checkpoint)
SHOWN = ("method", "group_size", "sym", "desc_act", "static_groups", "damp", "mse", "forward_dtype", "gptaq_alpha",
         "refit_scales", "calibration")


def run(name: str, quantize_args: list[str], tasks: str, limit: int, ppl_windows: int) -> None:
    """Quantize the demo model with BASE_ARGS + quantize_args into out/levers/NAME (unless there already), evaluate
    it and keep the results and the checkpoint's report in LEVERS/NAME (results-2.json, ... for later runs)."""
    bin_dir = Path(sys.executable).parent
    checkpoint, keep = Path("out/levers") / name, Path(LEVERS) / name
    if not (checkpoint / "quant_report.json").is_file():
        subprocess.run([str(bin_dir / "qwen-quantize"), "demo", *BASE_ARGS, *quantize_args, "--out", str(checkpoint),
                        "--overwrite", "--quiet"], check=True)
    elif quantize_args:
        print(f"{checkpoint} exists: evaluating it as it is (its quant_report.json says how it was made)")
    # a scratch folder per run: two runs scoring the same checkpoint on different tasks can go side by side
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}.eval-", dir="out/levers"))
    subprocess.run([str(bin_dir / "qwen-eval"), str(checkpoint), "--tasks", tasks, "--limit", str(limit),
                    "--ppl-windows", str(ppl_windows), "--seqlen", "512", "--batch", "8", "--device", "cpu",
                    "--out", str(scratch), "--quiet"], check=True)
    keep.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):  # the first free name; "x" mode: a run finishing at the same time takes the next
        try:
            with open(keep / ("results.json" if k == 1 else f"results-{k}.json"), "x") as f:
                f.write((scratch / "results.json").read_text())
            break
        except FileExistsError:
            continue
    shutil.copyfile(checkpoint / "quant_report.json", keep / "quant_report.json")
    shutil.rmtree(scratch)


def _key(r: dict) -> tuple:
    """What makes two results comparable item by item: task, metric, item count and, for perplexity, the windows."""
    d = r.get("details") or {}
    return r["task"], r["metric"], r["n"], d.get("seqlen"), d.get("slice"), (d.get("dataset") or {}).get("file")


def lever_rows(references: list[tuple[str, dict, dict]], levers: Path) -> list[dict]:
    """One row per checkpoint (the reference runs' own checkpoints first), each metric beside fp's on the same
    items. `references`: (folder, results.json, goals.json) of demo_accuracy_goals.py runs, fp first in each."""
    fp, rows = {}, {}
    for folder, reference, goals in references:
        fp_label = reference["models"][0]["label"]
        fp.update({_key(r): r for r in reference["results"] if r["model"] == fp_label})
        for label, settings in (goals.get("checkpoints") or {}).items():
            # goals.json of the first run predates recording forward_dtype; its commits' only value was the default
            settings.setdefault("forward_dtype", "auto")
            for k, off in OPT_IN_RUN_SETTINGS.items():  # likewise the opt-in settings that came later, off until then
                settings.setdefault(k, off)
            settings.pop("path", None)
            row = rows.get(label)
            if row is not None and _same_settings(row["settings"], settings):
                # the same recipe quantized again by a later commit (make demo reruns it): one row, both commits
                row["quantized_at"] = list(dict.fromkeys(row["quantized_at"] + [settings.get("commit")]))
            else:
                key = label if row is None else f"{label} ({folder})"
                row = rows[key] = {"lever": key, "settings": settings, "results": [], "scored_by": [],
                                   "quantized_at": [settings.get("commit")]}
            row["results"] += [r for r in reference["results"] if r["model"] == label]
            row["scored_by"].append(_scored_by(reference, folder + "/results.json"))
    for folder in sorted(p for p in levers.iterdir() if (p / "quant_report.json").is_file()):
        settings = checkpoint_settings(str(folder))
        settings.pop("path", None)
        row = rows.get(folder.name)
        if row is None or not _same_settings(row["settings"], settings):  # a lever or a reference's checkpoint
            key = folder.name if row is None else f"{folder.name} ({LEVERS})"
            row = rows[key] = {"lever": key, "settings": settings, "results": [], "scored_by": [], "quantized_at": []}
        row["quantized_at"] = list(dict.fromkeys(row["quantized_at"] + [settings.get("commit")]))
        # one qwen-eval run per results*.json (a lever can be scored on more tasks or items later)
        for path in sorted(folder.glob("results*.json"), key=lambda f: (len(f.name), f.name)):  # results.json first
            report = json.loads(path.read_text())
            row["results"] += report["results"]
            row["scored_by"].append(_scored_by(report, str(path.relative_to(ROOT))))
    for row in rows.values():
        row["cells"] = {column(r): cell(r, fp.get(_key(r))) for r in row.pop("results")}
    return list(rows.values())


def _same_settings(a: dict, b: dict) -> bool:
    """The same recipe: every recorded setting equal but where and when it ran."""
    drop = ("commit", "command", "path")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _scored_by(report: dict, source: str) -> dict:
    return {"command": report["env"].get("command"), "commit": report["env"].get("commit"), "json": source}


def column(result: dict) -> str:
    """Benchmarks name their item count: the same task on 300 and on 1000 items are different columns."""
    if result["metric"] == "perplexity":
        return f"{result['task']} perplexity"
    return f"{result['task']} {result['metric']} (n={result['n']})"


def cell(result: dict, fp: dict | None) -> dict:
    """One checkpoint's metric, its difference from fp on the same items and (benchmarks) the paired error."""
    from qwen_quant.accuracy.multiple_choice import paired_delta

    out = {"value": result["value"], "n": result["n"]}
    if fp is not None:
        out.update(fp=fp["value"], minus_fp=result["value"] - fp["value"])
        if result["metric"] != "perplexity":
            paired = paired_delta(fp["details"].get("per_item"), result["details"].get("per_item"))
            out["minus_fp_stderr"] = paired[1] if paired else None
    return out


def short(commit) -> str:
    """A commit as 10 hex digits, keeping '+dirty' (uncommitted changes when the run started)."""
    sha, plus, flag = str(commit).partition("+")
    return sha[:10] + plus + flag


def changed(settings: dict, base: dict) -> str:
    diffs = [f"{k}={settings.get(k)}" for k in SHOWN if settings.get(k) != base.get(k) and k in settings]
    return ", ".join(diffs) or "(the reference settings)"


def goal_summary(rows: list[dict], n: int = 1000) -> list[str]:
    """Issue 6's 2-point goal for every checkpoint scored on `n` items per benchmark: how many metrics are
    within 2 points of fp, and what their 95% intervals can tell (as demo_accuracy_goals.py counts them)."""
    from demo_accuracy_goals import POINTS, interval95, interval_vs_goal

    out = []
    for row in rows:
        cells = {c: v for c, v in row["cells"].items() if c.endswith(f"(n={n})") and v.get("minus_fp") is not None}
        if not cells:
            continue
        verdicts = [interval_vs_goal(interval95(v["minus_fp"], v.get("minus_fp_stderr"))).split()[0]
                    for v in cells.values()]
        within = sum(abs(v["minus_fp"]) <= POINTS for v in cells.values())
        worst = min(cells.items(), key=lambda kv: kv[1]["minus_fp"])
        out.append(f"| `{row['lever']}` | {len(cells)} | {within} of {len(cells)} | "
                   + " / ".join(str(verdicts.count(k)) for k in ("inside", "across", "outside"))
                   + f" | {worst[0].rsplit(' (', 1)[0]} {worst[1]['minus_fp']:+.1f} |")
    if not out:
        return []
    return ["", f"## The 2-point goal on {n} items", "",
            f"Benchmark metrics scored on {n} items, checkpoint - fp: how many lie within ±{POINTS:g} points, and "
            "their 95% intervals (paired): inside ±2, across a bound (more items needed) or outside.", "",
            "| checkpoint | metrics | within ±2 | 95% interval inside / across / outside | worst |",
            "|---|---|---|---|---|", *out]


def markdown(rows: list[dict], references: list[tuple[str, dict, dict]]) -> str:
    base = next((r["settings"] for r in rows if r["settings"].get("method") == "gptq"), {})
    columns = sorted({c for r in rows for c in r["cells"]}, key=lambda c: (not c.startswith("ppl"), c))
    fp_label = references[0][1]["models"][0]["label"]
    runs = ", ".join(f"[{folder}/results.md]({os.path.relpath(ROOT / folder / 'results.md', ROOT / LEVERS)})"
                     for folder, _, _ in references)
    lines = ["# Demo model: what moves Int4 accuracy (issue 6)", "",
             f"Each row is one checkpoint of the demo model, scored on the same items as fp (`{fp_label}`, in the "
             f"reference runs {runs}). A cell reads value (checkpoint - fp ± the paired standard error); perplexity "
             "cells carry the increase over fp. '—' = not measured. 'changed' is relative to the first GPTQ row: "
             f"{', '.join(f'{k}={base.get(k)}' for k in SHOWN if k in base)}.",
             "", "| checkpoint | changed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            cell = row["cells"].get(c)
            if cell is None:
                cells.append("—")
            elif c.startswith("ppl"):
                d = cell.get("minus_fp")
                cells.append(f"{cell['value']:.2f}" + (f" (+{d:.2f})" if d is not None else " (no fp on these windows)"))
            else:
                d, se = cell.get("minus_fp"), cell.get("minus_fp_stderr")
                pm = f" ± {se:.1f}" if se is not None else ""
                cells.append(f"{cell['value']:.1f}" + (f" ({d:+.1f}{pm})" if d is not None else " (no fp on these items)"))
        lines.append(f"| `{row['lever']}` | {changed(row['settings'], base)} | " + " | ".join(cells) + " |")
    lines += goal_summary(rows)
    lines += ["", "## Provenance", ""]
    for row in rows:
        s = row["settings"]
        scored = "; ".join(f"`{x['command']}` (commit `{short(x['commit'])}`, `{x['json']}`)" for x in row["scored_by"])
        commits = ", ".join(f"`{short(c)}`" for c in row["quantized_at"])
        lines.append(f"- `{row['lever']}`: quantized by `{s.get('command')}` (commit {commits}); "
                     f"scored by {scored}")
    env = references[0][1]["env"]
    lines += ["", f"Machine: CPU `{env.get('cpu')}` x{env.get('cpu_count')}, torch {env.get('torch')}, transformers "
                  f"{env.get('transformers')}. Written by `experiments/demo_accuracy_levers.py` from the JSON; no number "
                  "typed by hand."]
    return "\n".join(lines) + "\n"


def render(levers: Path) -> str:
    from qwen_quant.files import write_text_atomic

    references = [(folder, json.loads((ROOT / folder / "results.json").read_text()),
                   json.loads((ROOT / folder / "goals.json").read_text()))
                  for folder in REFERENCES if (ROOT / folder / "goals.json").is_file()]
    rows = lever_rows(references, levers)
    write_text_atomic(levers / "levers.json", json.dumps({"fp_model": references[0][1]["models"][0]["label"],
                                                          "references": [f for f, _, _ in references],
                                                          "levers": rows}, indent=1) + "\n")
    text = markdown(rows, references)
    write_text_atomic(levers / "levers.md", text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", nargs="?", default="render", choices=["render", "run"])
    p.add_argument("name", nargs="?", help="run: the lever's folder name")
    p.add_argument("--tasks", default="hellaswag", help="run: qwen-eval tasks (default hellaswag)")
    p.add_argument("--limit", type=int, default=300, help="run: items per benchmark (the reference run's 300)")
    p.add_argument("--ppl-windows", type=int, default=40, help="run: perplexity windows (the reference run's 40)")
    args, quantize_args = p.parse_known_args()
    os.chdir(ROOT)
    if args.action == "run":
        if not args.name:
            p.error("run needs a NAME, e.g. run damp10 --damp 0.1")
        run(args.name, quantize_args, args.tasks, args.limit, args.ppl_windows)
    elif quantize_args:
        p.error(f"unrecognized arguments: {' '.join(quantize_args)}")
    print(render(ROOT / LEVERS))


if __name__ == "__main__":
    main()
