"""Accuracy tables from qwen-eval results, and the release report that joins them with qwen-profile's
speed and memory tables and qwen-quantize's quant_report.

Every table is rendered from stored JSON. A cell that was not measured says "not measured", an
out-of-memory cell says "OOM", a metric that could not be computed says why: never a zero.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

from qwen_quant.errors import UserError
from qwen_quant.files import write_text_atomic

NOT_MEASURED = "not measured"

# Column titles in the seed's accuracy table shape (SEED.md), and which metric fills each.
PRIMARY_METRIC = {"humaneval": "pass@1"}
LOWER_IS_BETTER = ("perplexity",)

MEANINGS = {
    "perplexity": "Perplexity, GPTQ convention: the corpus concatenated, tokenized once, cut into "
                  "non-overlapping windows of `seqlen` tokens, exp(mean token NLL) over all windows; lower is "
                  "better. Numbers on different corpora, tokenizers or seqlens are not comparable, and this is "
                  "not lm-eval's word perplexity. ± is the delta-method standard error over windows.",
    "accuracy": "Accuracy in %: multiple choice by log-likelihood of each choice (lm-eval 0.4 prompts; MMLU "
                "5-shot by the answer letter), GSM8K by exact match of the last number of a greedy completion. "
                "± is the standard error of the mean over items; n is the item count. A Δ's ± is paired: "
                "the standard error of the per-item differences on the same items (smaller than either "
                "model's own ±, since both see the same questions).",
    "accuracy_norm": "Accuracy in % choosing by log-likelihood per character of the choice (lm-eval's acc_norm).",
    "accuracy_macro": "MMLU macro average: the mean of the per-subject accuracies (the micro average, "
                      "over all items, is `accuracy`).",
    "pass@1": "HumanEval pass@1 in %: one greedy completion per problem, its tests run in a sandboxed "
              "subprocess (time and memory limits, no network, scratch directory).",
}


# ---------------------------------------------------------------- cells

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _digits(metric: str) -> int:
    return 3 if metric.startswith("perplexity") else 1


def format_value(row: dict | None) -> str:
    """'12.345 ± 0.067', 'OOM', 'not measured' or 'missing: <why>' (never 0 for a hole)."""
    if row is None:
        return NOT_MEASURED
    details = row.get("details") or {}
    if row.get("status") == "oom" or details.get("oom"):
        return "OOM"
    value = row.get("value")
    if not _is_num(value):
        why = details.get("missing") or details.get("error")
        return f"missing: {why}" if why else NOT_MEASURED
    d = _digits(row["metric"])
    err = row.get("stderr")
    return f"{value:.{d}f} ± {err:.{d}f}" if _is_num(err) else f"{value:.{d}f}"


def paired_stderr(row: dict | None, ref: dict | None) -> float | None:
    """The standard error of row - ref over the same items (questions, or perplexity windows), when both
    stored their per-item results."""
    from qwen_quant.profile.accuracy.multiple_choice import paired_delta

    from qwen_quant.profile.accuracy.paired import perplexity_difference

    if row is None or ref is None:
        return None
    mine, theirs = row.get("details") or {}, ref.get("details") or {}
    nlls, ref_nlls = mine.get("per_window_nll"), theirs.get("per_window_nll")
    if nlls and ref_nlls and len(nlls) == len(ref_nlls) > 1:
        return perplexity_difference(ref_nlls, nlls)[1]
    paired = paired_delta(theirs.get("per_item"), mine.get("per_item"))
    return paired[1] if paired else None


def format_delta(row: dict | None, ref: dict | None) -> str:
    if row is None or ref is None or not _is_num(row.get("value")) or not _is_num(ref.get("value")):
        return ""
    d = _digits(row["metric"])
    err = paired_stderr(row, ref)
    return f"{row['value'] - ref['value']:+.{d}f}" + (f" ± {err:.{d}f}" if _is_num(err) else "")


def _index(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r["task"], r["metric"]): r for r in rows}


def _models(report: dict) -> list[str]:
    labels = [m["label"] for m in report.get("models", [])]
    for r in report.get("results", []):
        if r["model"] not in labels:
            labels.append(r["model"])
    return labels


def _task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for r in rows:
        if (r["task"], r["metric"]) not in seen:
            seen.append((r["task"], r["metric"]))
    return seen


def primary_metric(task: str) -> str:
    if task.startswith("ppl"):
        return "perplexity"
    return PRIMARY_METRIC.get(task, "accuracy")


def _title(task: str) -> str:
    from qwen_quant.profile.accuracy.tasks import TASKS

    t = TASKS.get(task)
    return t.title if t else task


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- accuracy tables

def accuracy_table(report: dict) -> str:
    """The seed's shape: one row per model, one column per task (its main metric), deltas vs the first."""
    rows = report.get("results", [])
    idx, models = _index(rows), _models(report)
    tasks = []
    for r in rows:
        if r["task"] not in tasks and r["metric"] == primary_metric(r["task"]):
            tasks.append(r["task"])
    if not tasks:
        return "_no accuracy results_\n"
    header = ["model"] + [f"{_title(t)} ({'↓' if t.startswith('ppl') else '%'})" for t in tasks]
    body = []
    for i, m in enumerate(models):
        cells = [m]
        for t in tasks:
            row = idx.get((m, t, primary_metric(t)))
            cell = format_value(row)
            if i > 0:
                delta = format_delta(row, idx.get((models[0], t, primary_metric(t))))
                cell += f" (Δ {delta})" if delta else ""
            cells.append(cell)
        body.append(cells)
    return _md_table(header, body)


def all_metrics_table(report: dict) -> str:
    rows = report.get("results", [])
    idx, models = _index(rows), _models(report)
    header = ["task", "metric"] + [models[0]] + sum([[m, "Δ"] for m in models[1:]], []) + ["n"]
    body = []
    for task, metric in _task_metrics(rows):
        if metric.startswith("perplexity@"):
            continue
        ref = idx.get((models[0], task, metric))
        cells = [task, metric, format_value(ref)]
        for m in models[1:]:
            row = idx.get((m, task, metric))
            cells += [format_value(row), format_delta(row, ref)]
        n = [str(idx[(m, task, metric)]["n"]) for m in models if (m, task, metric) in idx]
        cells.append(n[0] if len(set(n)) == 1 else "/".join(n))
        body.append(cells)
    return _md_table(header, body)


def long_context_table(report: dict) -> str | None:
    rows = [r for r in report.get("results", []) if r["metric"].startswith("perplexity@")]
    if not rows:
        return None
    idx = _index(rows)
    lengths = sorted({int(r["metric"].split("@")[1]) for r in rows})
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        header = ["model"] + [f"{L} tokens" for L in lengths]
        body = [[m] + [format_value(idx.get((m, task, f"perplexity@{L}"))) for L in lengths]
                for m in _models(report)]
        out.append(f"**{_title(task)}**, perplexity by window length\n\n" + _md_table(header, body))
    return "\n".join(out)


def subjects_table(report: dict) -> str | None:
    rows = [r for r in report.get("results", []) if r["metric"] == "accuracy" and (r.get("details") or {}).get("subjects")]
    if not rows:
        return None
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        per_model = {r["model"]: r["details"]["subjects"] for r in rows if r["task"] == task}
        models = [m for m in _models(report) if m in per_model]
        subjects = sorted({s for v in per_model.values() for s in v})
        body = []
        for s in subjects:
            cells = [s.replace("_", " ")]
            for m in models:
                cell = per_model[m].get(s)
                cells.append(f"{cell['accuracy']:.1f}" if cell else NOT_MEASURED)
            n = per_model[models[0]].get(s, {}).get("n")
            body.append(cells + [str(n) if n is not None else ""])
        out.append(f"**{_title(task)} per subject** (accuracy %)\n\n" + _md_table(["subject"] + models + ["n"], body))
    return "\n".join(out)


def provenance_lines(report: dict) -> list[str]:
    """Corpus, slice, seqlen, tokenizer of each perplexity; dataset of each benchmark."""
    lines, seen = [], set()
    for r in report.get("results", []):
        d = r.get("details") or {}
        if r["task"] in seen:
            continue
        seen.add(r["task"])
        if r["metric"].startswith("perplexity"):
            src = d.get("source") or {}
            lines.append(f"- **{r['task']}**: corpus `{d.get('corpus')}` ({src.get('package', '')} "
                         f"{src.get('version', '')}, split `{d.get('split')}`), {d.get('slice')}, seqlen "
                         f"{d.get('seqlen')}, {d.get('tokens', '?')} tokens, tokenizer `{d.get('tokenizer')}`")
        else:
            ds = d.get("dataset") or {}
            what = ", ".join(f"{k} {v}" for k, v in ds.items() if isinstance(v, (str, int, float))) or "?"
            lines.append(f"- **{r['task']}**: {what}; shots {d.get('shots', 0)}; n {r.get('n')}")
    return lines


def meanings(report: dict) -> list[str]:
    metrics = {r["metric"].split("@")[0] for r in report.get("results", [])}
    return [f"- **{m}**: {MEANINGS[m]}" for m in MEANINGS if m in metrics]


def accuracy_markdown(report: dict) -> str:
    models = report.get("models", [])
    parts = ["# Accuracy\n", f"Models ({len(models)}), the first is the reference for Δ: " +
             ", ".join(f"`{m['label']}` ({m.get('spec')})" for m in models) + "\n",
             accuracy_table(report), "\n## All metrics\n", all_metrics_table(report)]
    for extra in (long_context_table(report), subjects_table(report)):
        if extra:
            parts += ["\n", extra]
    parts += ["\n## Data\n", "\n".join(provenance_lines(report)) + "\n",
              "\n## What the numbers mean\n", "\n".join(meanings(report)) + "\n"]
    env = report.get("env") or {}
    if env:
        parts += ["\n## Environment\n", env_lines(env)]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def env_lines(env: dict) -> str:
    keys = ("command", "date", "commit", "cpu", "cpu_count", "gpu", "driver", "cuda", "python", "torch",
            "transformers", "triton", "qwen_quant")
    return "\n".join(f"- {k}: `{env.get(k)}`" for k in keys if env.get(k) is not None) + "\n"


def accuracy_csv(report: dict) -> str:
    rows = report.get("results", [])
    idx, models = _index(rows), _models(report)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "task", "metric", "value", "stderr", "n", "delta_vs_first", "delta_stderr_paired",
                "details"])
    for r in rows:
        ref = idx.get((models[0], r["task"], r["metric"])) if models else None
        delta = r["value"] - ref["value"] if ref and _is_num(r.get("value")) and _is_num(ref.get("value")) else ""
        paired = paired_stderr(r, ref) if delta != "" else None
        w.writerow([r["model"], r["task"], r["metric"], "" if r.get("value") is None else r["value"],
                    "" if r.get("stderr") is None else r["stderr"], r.get("n"), delta,
                    "" if paired is None else paired,
                    json.dumps(r.get("details") or {}, ensure_ascii=False, default=str)])
    return buf.getvalue()


# ---------------------------------------------------------------- qwen-report: the release README

SEED_ACCURACY = """| model | MMLU | C-Eval (val) | GSM8K | HumanEval |
|---|---|---|---|---|
| Qwen-7B-Chat BF16 | 53.9 | 54.2 | 41.1 | 24.4 |
| Qwen-7B-Chat Int4 | 52.6 | 52.9 | 38.1 | 23.8 |
| Qwen-14B-Chat BF16 | 64.6 | 69.8 | 61.0 | 43.9 |
| Qwen-14B-Chat Int4 | 63.3 | 69.0 | 59.8 | 45.7 |
"""

THROUGHPUT_MEANING = ("- **tokens/s** (speed tables): new tokens / total `generate` time from a 1-token context "
                      "(the seed's definition: prefill included), median over repeats; decode-only tokens/s "
                      "counts the later tokens over their own time.\n"
                      "- **GiB**: 2^30 bytes. GPU: peak allocated by the PyTorch allocator, reset per cell "
                      "(reserved and NVML beside it in the details); CPU: peak RSS of the cell's process. "
                      "The seed printed GiB values labelled 'GB'.\n")


@dataclasses.dataclass
class Inputs:
    """The JSON files a report is built from, found by file name."""
    evals: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)
    profiles: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)
    quants: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): give results.json / quant_report.json "
                        f"files written by qwen-eval, qwen-profile or qwen-quantize") from None


def find_inputs(paths: list[str | Path]) -> Inputs:
    """results.json (qwen-eval: `results` rows; qwen-profile: `cells`) and quant_report.json, in the
    given folders (searched recursively) or given directly."""
    found = Inputs()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} not found: give folders or files written by qwen-eval, qwen-profile or qwen-quantize")
        files = [p] if p.is_file() else sorted(list(p.rglob("results.json")) + list(p.rglob("quant_report.json")))
        for f in files:
            data = _read_json(f)
            if f.name == "quant_report.json" or "quantization_config" in data:
                found.quants.append((f, data))
            elif "cells" in data:
                found.profiles.append((f, data))
            elif isinstance(data.get("results"), list):
                found.evals.append((f, data))
            elif p.is_file():
                raise UserError(f"{f} is neither an eval, a profile nor a quant report JSON")
    if not (found.evals or found.profiles or found.quants):
        raise UserError(f"no results.json or quant_report.json under {', '.join(map(str, paths))}: "
                        f"run qwen-eval / qwen-profile / qwen-quantize first")
    return found


def report_model_name(inputs: Inputs) -> str:
    for _, q in inputs.quants:
        model = q.get("model") or {}
        name = model.get("base_model") or model.get("source")
        if name:
            return Path(str(name).rstrip("/")).name
    for _, e in inputs.evals:
        if e.get("models"):
            return e["models"][0]["label"]
    for _, p in inputs.profiles:
        cells = p.get("cells") or []
        if cells and cells[0].get("model"):
            return Path(str(cells[0]["model"]).rstrip("/")).name
    return "model"


def _demote(markdown: str) -> str:
    """A sub-report without its title, its other headings one level down (they nest under ours)."""
    markdown = re.sub(r"\A# [^\n]*\n+", "", markdown)
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def _relative(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target, start)
    except ValueError:
        return str(target)


def accuracy_section(inputs: Inputs) -> list[str]:
    out = ["## Accuracy\n"]
    if not inputs.evals:
        return out + [f"{NOT_MEASURED}: no qwen-eval results.json was given.\n"]
    for path, e in inputs.evals:
        out += [f"From `{path}` (models: " + ", ".join(f"`{m['label']}`" for m in e.get("models", [])) +
                "; the first is the reference for Δ):\n", accuracy_table(e)]
        for extra in (long_context_table(e),):
            if extra:
                out.append(extra)
        out += ["<details><summary>All metrics, data slices</summary>\n", all_metrics_table(e),
                "\n".join(provenance_lines(e)) + "\n", "</details>\n"]
    names = " ".join(m["label"].lower() for _, e in inputs.evals for m in e.get("models", []))
    if re.search(r"qwen-(7|14)b", names):
        out += ["For reference, **the seed's published figures** (Qwen's 2023 Int4 release; A100, AutoGPTQ, "
                "not measured by us):\n", SEED_ACCURACY]
    return out


def speed_memory_sections(inputs: Inputs, out_dir: Path) -> list[str]:
    from qwen_quant.profile import tables

    if not inputs.profiles:
        return ["## Speed\n", f"{NOT_MEASURED}: no qwen-profile results.json was given.\n",
                "## Memory\n", f"{NOT_MEASURED}: no qwen-profile results.json was given.\n"]
    speed, memory = ["## Speed\n"], ["## Memory\n"]
    for path, p in inputs.profiles:
        speed.append(_demote(tables.speed_markdown(p)))
        memory.append(_demote(tables.memory_markdown(p)))
        for png in sorted(path.parent.glob("*.png")):
            shutil.copyfile(png, out_dir / png.name)  # the report folder stands on its own
            (memory if "mem" in png.stem else speed).append(f"![{png.stem}]({png.name})\n")
    return speed + memory


def _short(value, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_num(value) else NOT_MEASURED


def quantization_section(inputs: Inputs) -> list[str]:
    if not inputs.quants:
        return []
    out = ["## Quantization\n"]
    for path, q in inputs.quants:
        qc = q.get("quantization_config") or {}
        calib = q.get("calibration") or {}
        totals = q.get("totals") or {}
        out.append(f"- `{path.parent.name}`: {qc.get('quant_method', 'gptq')} bits {qc.get('bits')}, group size "
                   f"{qc.get('group_size')}, sym {qc.get('sym')}, desc_act {qc.get('desc_act')}, damp "
                   f"{qc.get('damp_percent')}; method {(q.get('settings') or {}).get('method')}; calibration "
                   f"{calib.get('nsamples')} x {calib.get('seqlen')} tokens from `{calib.get('source')}`; mean "
                   f"relative layer error {_short(totals.get('mean_rel_error'), 4)}; "
                   f"{_short(totals.get('seconds'), 1)} s; "
                   f"command `{q.get('command')}`")
    return out + [""]


def provenance_section(inputs: Inputs) -> list[str]:
    out = ["## Environment and commands\n"]
    for kind, items in (("qwen-eval", inputs.evals), ("qwen-profile", inputs.profiles)):
        for path, data in items:
            out += [f"**{kind}** (`{path}`)\n", env_lines(data.get("env") or {})]
    return out


def render_report(inputs: Inputs, out_dir: Path) -> str:
    name = report_model_name(inputs)
    parts = [f"# {name}: accuracy, speed and memory\n",
             "Written by `qwen-report` from the JSON files listed below; every number comes from them. "
             "Cells that ran out of memory show **OOM**, cells never measured **not measured** — never 0.\n"]
    parts += accuracy_section(inputs) + speed_memory_sections(inputs, out_dir) + quantization_section(inputs)
    metrics = meanings({"results": [r for _, e in inputs.evals for r in e.get("results", [])]})
    parts += ["## What the numbers mean\n", "\n".join(metrics) + "\n" + THROUGHPUT_MEANING]
    parts += provenance_section(inputs)
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def write_report(paths: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """qwen-report's API: find the JSONs, write <out_dir>/README.md (default reports/<model>/)."""
    inputs = find_inputs(paths)
    out = Path(out_dir) if out_dir else Path("reports") / report_model_name(inputs)
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    write_text_atomic(readme, render_report(inputs, out))
    return readme
