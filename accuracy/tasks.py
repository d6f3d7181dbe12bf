"""The task registry: which tasks exist, what kind each is, and where its data comes from.

A task's data is loaded once per run (the same items for every model); `--limit N` takes the
first N items in the reader's fixed order (windows for perplexity).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen_quant.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "perplexity" | "choice" | "gsm8k" | "humaneval"
    title: str  # column header in tables
    with_norm: bool = False  # also report accuracy_norm (the harness reports acc_norm)
    chance: float | None = None  # accuracy of guessing, in %
    shots: int = 0
    needs_file: bool = False  # ppl needs --ppl-text; ceval/cmmlu take NAME=FILE here
    corpus: str | None = None  # perplexity: the package corpus (corpora.NAMED_CORPORA) whose eval split is scored


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("ppl-wiki", "perplexity", "Wikipedia EN ppl", corpus="wiki"),
    Task("ppl-zh", "perplexity", "People's Daily ZH ppl", corpus="peoples-daily"),
    Task("ppl-code", "perplexity", "HumanEval code ppl", corpus="humaneval-code"),
    Task("ppl-fr", "perplexity", "Wikipedia FR ppl", corpus="wiki-fr"),
    Task("ppl-fiction", "perplexity", "LAMBADA fiction ppl", corpus="fiction"),
    Task("ppl", "perplexity", "text ppl", needs_file=True),
    Task("mmlu", "choice", "MMLU", chance=25.0, shots=5),
    Task("arc-easy", "choice", "ARC-Easy", with_norm=True, chance=25.0),
    Task("arc-challenge", "choice", "ARC-Challenge", with_norm=True, chance=25.0),
    Task("hellaswag", "choice", "HellaSwag", with_norm=True, chance=25.0),
    Task("winogrande", "choice", "WinoGrande", chance=50.0),
    Task("piqa", "choice", "PIQA", with_norm=True, chance=50.0),
    Task("ceval", "choice", "C-Eval", chance=25.0, shots=5),
    Task("cmmlu", "choice", "CMMLU", chance=25.0, shots=5),
    Task("gsm8k", "gsm8k", "GSM8K", chance=0.0, shots=8),
    Task("humaneval", "humaneval", "HumanEval", chance=0.0),
]}

# Tasks whose data a user names as NAME=FILE (a local CSV/JSONL) or NAME=hf:<dataset id>.
FILE_TASKS = ("ceval", "cmmlu")


@dataclasses.dataclass(frozen=True)
class TaskRequest:
    task: Task
    source: str | None = None  # a local file or hf:<id> for ceval/cmmlu


def parse_tasks(text: str | list[str]) -> list[TaskRequest]:
    """'ppl-wiki,mmlu,ceval=path.csv' -> task requests; unknown names are one-line errors."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p and p.strip()]
    if not parts:
        raise UserError(f"no tasks given: pass --tasks with some of: {', '.join(TASKS)}")
    out = []
    for part in parts:
        name, _, source = part.partition("=")
        task = TASKS.get(name)
        if task is None:
            raise UserError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
        if source and name not in FILE_TASKS:
            raise UserError(f"task {name} takes no file (only {', '.join(FILE_TASKS)} take NAME=FILE)")
        if source and not source.startswith("hf:") and not Path(source).exists():
            raise UserError(f"task file {source} not found")
        out.append(TaskRequest(task, source or None))
    if len({r.task.name for r in out}) != len(out):
        raise UserError("a task is listed twice in --tasks")
    return out


def _datasets():
    from qwen_quant.accuracy import datasets

    return datasets


def load_items(request: TaskRequest, limit: int | None) -> tuple[list, dict]:
    """(items, description) from the data readers, the first `limit` items in a fixed order."""
    ds = _datasets()
    name = request.task.name
    if name in FILE_TASKS:
        source = request.source or f"hf:{name}"
        result = ds.load_local_mc(source, limit=limit) if not source.startswith("hf:") else \
            ds.load_hub_mc(source[3:], limit=limit)
    else:
        result = ds.load_task(name, limit=limit)
    items, description = result if isinstance(result, tuple) else (result, {})
    if not items:
        raise UserError(f"task {name} has no items: check its data file")
    return list(items), dict(description or {})
