"""Accuracy tables from qwen-eval results: one row per model, one column per task, deltas against the first
model with their paired standard errors; the same as Markdown and CSV.

Every table is rendered from stored JSON. A cell that was not measured says "not measured", an
out-of-memory cell says "OOM", a metric that could not be computed says why: never a zero.
"""

from __future__ import annotations

import csv
import io
import json
import math

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
                "model's own ±, since both see the same questions). A Δ marked (first k) is over the k items both "
                "rows scored, where one row was scored on more items (a table grown across sessions).",
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


def _on_common_items(*lists):
    """The lists cut to the items all of them scored, and how many that is. qwen-eval scores a task's items in
    one fixed order (doc id, round robin over subjects, window by window) and --limit takes the first n, so a
    row evaluated with a larger --limit (a table grown across sessions) shares its first n items with a
    smaller one: the common prefix is the same items, and only there is a difference paired."""
    k = min(len(x) for x in lists)
    return [x[:k] for x in lists], k


def paired_comparison(row: dict | None, ref: dict | None) -> tuple[float, float | None, int | None] | None:
    """(row - ref, its paired standard error, the items it is over) or None without two numbers.

    On the same items: the values' difference, with the paired error where both stored per-item results.
    Where one row scored more items than the other, the difference and its error are taken on the items both
    scored (their per-item results), never between values over different items; without per-item results
    there is then no difference to give."""
    from qwen_quant.accuracy.multiple_choice import paired_delta
    from qwen_quant.accuracy.paired import perplexity_difference

    if row is None or ref is None or not _is_num(row.get("value")) or not _is_num(ref.get("value")):
        return None
    mine, theirs = row.get("details") or {}, ref.get("details") or {}
    nlls, ref_nlls = mine.get("per_window_nll"), theirs.get("per_window_nll")
    items, ref_items = mine.get("per_item"), theirs.get("per_item")
    same_n = row.get("n") == ref.get("n")
    if nlls and ref_nlls and min(len(nlls), len(ref_nlls)) > 1:
        (ref_nlls, nlls), k = _on_common_items(ref_nlls, nlls)
        delta, err = perplexity_difference(ref_nlls, nlls)
        return (row["value"] - ref["value"] if same_n else delta), err, k
    if items and ref_items and min(len(items), len(ref_items)) > 1:
        (ref_items, items), k = _on_common_items(ref_items, items)
        delta, err = paired_delta(ref_items, items)
        return (row["value"] - ref["value"] if same_n else delta), err, k
    return (row["value"] - ref["value"], None, row.get("n")) if same_n else None


def format_delta(row: dict | None, ref: dict | None) -> str:
    """'+1.2 ± 0.4'; with ' (first 500)' when the rows scored different item counts and the difference is
    over the items both scored."""
    got = paired_comparison(row, ref)
    if got is None:
        return ""
    delta, err, k = got
    d = _digits(row["metric"])
    text = f"{delta:+.{d}f}" + (f" ± {err:.{d}f}" if _is_num(err) else "")
    return text + (f" (first {k})" if k is not None and k != max(row.get("n") or 0, ref.get("n") or 0) else "")


def item_changes(row: dict | None, ref: dict | None) -> tuple[int, int, int] | None:
    """(gained, lost, k): of the k items both rows scored (the common prefix, as for a Δ), how many `row` got
    right and `ref` wrong, and the reverse. None unless both stored per-item right/wrong flags. A Δ's paired
    error says how big a change is; these two counts say how many items moved each way, and the exact sign test
    on them needs no normal approximation (a few items moving is the usual case between 4-bit rows)."""
    flags = [(r or {}).get("details", {}).get("per_item") for r in (row, ref)]
    if not all(isinstance(f, str) and f and set(f) <= {"0", "1"} for f in flags):
        return None
    (mine, theirs), k = _on_common_items(*flags)
    gained = sum(a == "1" and b == "0" for a, b in zip(mine, theirs))
    lost = sum(a == "0" and b == "1" for a, b in zip(mine, theirs))
    return gained, lost, k


def item_changes_table(report: dict) -> str | None:
    """Per task with per-item results: each model against the first, 'gained / lost (sign test p)'."""
    from qwen_quant.accuracy.paired import sign_test

    rows = report.get("results", [])
    idx, models = _index(rows), _models(report)
    body = []
    for task, metric in _task_metrics(rows):
        ref = idx.get((models[0], task, metric))
        cells, any_cell = [task, metric], False
        for m in models[1:]:
            got = item_changes(idx.get((m, task, metric)), ref)
            if got is None:
                cells.append("—")
                continue
            gained, lost, k = got
            any_cell = True
            both_n = max(idx[(m, task, metric)].get("n") or 0, ref.get("n") or 0)
            cells.append(f"{gained} / {lost} (p {_p(sign_test(gained, lost))})" + (f" (first {k})" if k != both_n else ""))
        if any_cell:
            body.append(cells)
    return _md_table(["task", "metric"] + models[1:], body) if body else None


def _p(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


ITEM_CHANGES_NOTE = ("Items each model got right and `{ref}` wrong / the reverse, on the items both scored, with the "
                     "two-sided exact sign test of that split (under no difference each such item is a fair coin; "
                     "McNemar's exact test).\n")


def item_changes_section(report: dict, level: int = 2) -> list[str]:
    """The "Item by item" section (heading at `level`, deeper where it nests in a combined report), or nothing."""
    table = item_changes_table(report)
    if not table:
        return []
    return [f"\n{'#' * level} Item by item\n", ITEM_CHANGES_NOTE.format(ref=_models(report)[0]), table]


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
    from qwen_quant.accuracy.tasks import TASKS

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
    synthetic = [m["label"] for m in models if (m.get("description") or {}).get("synthetic")]
    parts = ["# Accuracy\n", f"Models ({len(models)}), the first is the reference for Δ: " +
             ", ".join(f"`{m['label']}` ({m.get('spec')})" for m in models) + "\n"]
    if synthetic:
        parts.append(f"**A path check, not an accuracy:** {', '.join(f'`{s}`' for s in synthetic)} "
                     f"{'has' if len(synthetic) == 1 else 'have'} random weights (qwen-eval --allow-synthetic).\n")
    parts += [accuracy_table(report), "\n## All metrics\n", all_metrics_table(report)]
    parts += item_changes_section(report)
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
                "delta_n", "details"])
    for r in rows:
        ref = idx.get((models[0], r["task"], r["metric"])) if models else None
        delta, paired, items = paired_comparison(r, ref) or ("", None, "")
        w.writerow([r["model"], r["task"], r["metric"], "" if r.get("value") is None else r["value"],
                    "" if r.get("stderr") is None else r["stderr"], r.get("n"), delta,
                    "" if paired is None else paired, "" if items is None else items,
                    json.dumps(r.get("details") or {}, ensure_ascii=False, default=str)])
    return buf.getvalue()




# ---------------------------------------------------------------- a comparison across qwen-eval runs

# what the Runs section says of each run: enough to tell runs made on different machines apart
RUN_KEYS = ("commit", "date", "command", "cpu", "gpu", "torch")


def join_results(reports: list[dict]) -> dict:
    """Several qwen-eval results (one model each, or more) as one report: models in the given order, every
    row kept; the first model is the reference. Paired errors need the same items: qwen-eval's readers are
    deterministic, and rows whose per-item lists differ in length are shown without a paired error."""
    models, results = [], []
    for rep in reports:
        for m in rep.get("models", []):
            label = m["label"]
            if any(x["label"] == label for x in models):
                raise ValueError(f"two results are labelled {label!r}: give the runs distinct folder names")
            models.append(m)
        results += rep.get("results", [])
    return {"kind": "eval", "env": reports[0].get("env", {}) if reports else {}, "models": models,
            "results": results, "runs": [{"models": [m["label"] for m in r.get("models", [])],
                                          "env": {k: r.get("env", {}).get(k) for k in RUN_KEYS}}
                                         for r in reports]}


def carry_rows(earlier: dict, joined: dict) -> dict:
    """`joined` on top of an `earlier` comparison (its comparison.json): the earlier models keep their places
    (the reference stays first) and results, except the (model, task) cells `joined` measured again, which it
    replaces; new models follow. So a row grows by a task (a HumanEval column scored in a later session) without
    its other tasks being scored again; the caller vouches that it is the same checkpoint (the Runs list names
    each run's command). The per-item and per-window lists travel in the results, so paired errors still hold
    after the sessions' work folders (checkpoints, item stores) are gone. Earlier runs stay listed while any of
    their models' earlier results do."""
    fresh = {m["label"]: m for m in joined["models"]}
    kept = [m["label"] for m in earlier.get("models", [])]
    models = [fresh.get(label, m) for label, m in zip(kept, earlier.get("models", []))]
    models += [m for label, m in fresh.items() if label not in kept]
    remeasured = {(r["model"], r["task"]) for r in joined["results"]}
    carried = [r for r in earlier.get("results", []) if (r["model"], r["task"]) not in remeasured]
    still_shown = {r["model"] for r in carried}
    runs = [r for r in earlier.get("runs", []) if set(r.get("models", [])) & still_shown] + joined["runs"]
    # a run joined again (its results folder is still there when the table is rendered again) is listed once
    runs = list({json.dumps(r, sort_keys=True): r for r in runs}.values())
    return {**joined, "models": models, "results": carried + joined["results"], "runs": runs}


def loss_ratio_table(report: dict, baseline: str) -> str | None:
    """Per perplexity task: (ppl - ppl_ref) / (ppl_baseline - ppl_ref) ± its paired error, per model, the first
    model being the reference (fp) and `baseline` (e.g. RTN) the quantizer to beat (below 1: loses less)."""
    from qwen_quant.accuracy.paired import loss_ratio

    idx, models = _index(report.get("results", [])), _models(report)
    tasks = [t for t, m in _task_metrics(report.get("results", [])) if m == "perplexity"]
    if baseline not in models or not tasks:
        return None
    ref = models[0]
    body = []
    for model in models:
        if model in (ref, baseline):
            continue
        cells = []
        for t in tasks:
            rows = [idx.get((m, t, "perplexity")) for m in (ref, baseline, model)]
            nlls = [(r or {}).get("details", {}).get("per_window_nll") for r in rows]
            if not all(nlls):
                cells.append("—")
                continue
            nlls, k = _on_common_items(*nlls)
            got = loss_ratio(*nlls) if k > 1 else None
            first = f" (first {k})" if k < max(len(r["details"]["per_window_nll"]) for r in rows) else ""
            cells.append("—" if got is None else f"{got[0]:.2f} ± {got[1]:.2f}{first}")
        body.append([model] + cells)
    header = ["model"] + [f"{_title(t)}: loss / {baseline}'s" for t in tasks]
    return _md_table(header, body)


def comparison_markdown(report: dict, baseline: str | None = None, title: str = "Comparison") -> str:
    """The accuracy table (every model against the first, paired errors), and with a baseline the loss ratios."""
    models = _models(report)
    parts = [f"# {title}\n", f"Reference (Δ against it): `{models[0]}`. Models: "
             + ", ".join(f"`{m}`" for m in models) + ".\n", accuracy_table(report)]
    ratios = loss_ratio_table(report, baseline) if baseline else None
    if ratios:
        parts += [f"\n## Perplexity loss against `{baseline}`'s\n",
                  f"(ppl − ppl of `{models[0]}`) / (ppl of `{baseline}` − ppl of `{models[0]}`) on the same windows, "
                  "± the paired standard error (delta method over windows). Below 1: the model loses less than "
                  f"`{baseline}`.\n", ratios]
    parts += ["\n## All metrics\n", all_metrics_table(report)] + item_changes_section(report)
    parts += ["\n## Data\n", "\n".join(provenance_lines(report)) + "\n",
              "\n## What the numbers mean\n", "\n".join(meanings(report)) + "\n", "\n## Runs\n",
              "\n".join(f"- {', '.join(r['models'])}: commit {r['env'].get('commit')}, {r['env'].get('date')}, "
                        + "".join(f"{r['env'][k]}, " for k in ("cpu", "gpu") if r["env"].get(k))
                        + f"`{r['env'].get('command')}`" for r in report.get("runs", [])) + "\n"]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)
