"""The task table: every task qwen-eval knows, one row each, carrying what it is (kind, title, chance,
shots), where its data comes from (a perplexity corpus, or a reader of benchmark items) and how an item
becomes a scored question. A new task is one row.

A task's data is loaded once per run (the same items for every model); `--limit N` takes the first N
items in the reader's fixed order; `--ppl-windows N` the first N windows of a perplexity corpus.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from qwen_quant.accuracy import datasets as ds
from qwen_quant.accuracy import multiple_choice as mc
from qwen_quant.errors import UserError


def _lettered(header: Callable[[str | None], str]):
    """MMLU-style questions (the subject's header, k shots, lettered choices) for a task with `shots`."""
    def question(item, task: "Task") -> mc.Question:
        shots = list(mc.field(item, "fewshot", "shots", default=[]) or [])[:task.shots]
        return mc.lettered_question(item, header(mc.field(item, "subject")), shots)
    return question


def _ceval_header(subject: str | None) -> str:
    return f"以下是中国关于{subject or '综合'}考试的单项选择题，请选出其中的正确答案。\n\n"


def _cmmlu_header(subject: str | None) -> str:
    return f"以下是关于{subject or '综合'}的单项选择题，请直接给出正确答案的选项。\n\n"


def _plain(build: Callable) -> Callable:
    return lambda item, task: build(item)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "perplexity" | "choice" | "gsm8k" | "humaneval"
    title: str  # column header in tables
    with_norm: bool = False  # also report accuracy_norm (the harness reports acc_norm)
    chance: float | None = None  # accuracy of guessing, in %
    shots: int = 0
    needs_file: bool = False  # ppl needs --ppl-text; ceval/cmmlu take NAME=FILE
    corpus: str | None = None  # perplexity: the package corpus (corpora.NAMED_CORPORA) whose eval split is scored
    reader: Callable | None = None  # benchmarks: limit -> (items, description), in a fixed order
    question: Callable | None = None  # choice tasks: (item, task) -> multiple_choice.Question


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("ppl-wiki", "perplexity", "Wikipedia EN ppl", corpus="wiki"),
    Task("ppl-zh", "perplexity", "People's Daily ZH ppl", corpus="peoples-daily"),
    Task("ppl-code", "perplexity", "HumanEval code ppl", corpus="humaneval-code"),
    Task("ppl-fr", "perplexity", "Wikipedia FR ppl", corpus="wiki-fr"),
    Task("ppl-fiction", "perplexity", "LAMBADA fiction ppl", corpus="fiction"),
    Task("ppl", "perplexity", "text ppl", needs_file=True),
    Task("mmlu", "choice", "MMLU", chance=25.0, shots=5, reader=ds.mmlu, question=_lettered(mc.mmlu_header)),
    # zero-shot: a fifth of the tokens per question (a CPU can score hundreds), the seed's own MMLU is 5-shot
    Task("mmlu-0shot", "choice", "MMLU (0-shot)", chance=25.0, shots=0, reader=ds.mmlu,
         question=_lettered(mc.mmlu_header)),
    Task("arc-easy", "choice", "ARC-Easy", with_norm=True, chance=25.0,
         reader=lambda limit=None: ds.arc(False, limit), question=_plain(mc.qa_question)),
    Task("arc-challenge", "choice", "ARC-Challenge", with_norm=True, chance=25.0,
         reader=lambda limit=None: ds.arc(True, limit), question=_plain(mc.qa_question)),
    Task("hellaswag", "choice", "HellaSwag", with_norm=True, chance=25.0, reader=ds.hellaswag,
         question=_plain(mc.hellaswag_question)),
    Task("winogrande", "choice", "WinoGrande", chance=50.0, reader=ds.winogrande,
         question=_plain(mc.winogrande_question)),
    Task("piqa", "choice", "PIQA", with_norm=True, chance=50.0, reader=ds.piqa, question=_plain(mc.qa_question)),
    Task("ceval", "choice", "C-Eval", chance=25.0, shots=5, needs_file=True, question=_lettered(_ceval_header)),
    Task("cmmlu", "choice", "CMMLU", chance=25.0, shots=5, needs_file=True, question=_lettered(_cmmlu_header)),
    Task("gsm8k", "gsm8k", "GSM8K", chance=0.0, shots=8, reader=ds.gsm8k),
    Task("humaneval", "humaneval", "HumanEval", chance=0.0, reader=ds.humaneval),
]}

# Tasks whose data a user names as NAME=FILE (a local CSV/JSONL) or NAME=hf:<dataset id>.
FILE_TASKS = tuple(t.name for t in TASKS.values() if t.needs_file and t.kind == "choice")


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


def load_items(request: TaskRequest, limit: int | None) -> tuple[list, dict]:
    """(items, description) from the task's reader, the first `limit` items in a fixed order."""
    task = request.task
    if task.name in FILE_TASKS:
        source = request.source or f"hf:{task.name}"
        items, description = ds.load_hub_mc(source[3:], limit=limit) if source.startswith("hf:") else \
            ds.load_local_mc(source, limit=limit)
    else:
        items, description = task.reader(limit=limit)
    if not items:
        raise UserError(f"task {task.name} has no items: check its data file")
    return list(items), dict(description or {})


def questions(request: TaskRequest, items: list) -> list[mc.Question]:
    """The scored form of a choice task's items (the prompt formats of lm-eval 0.4)."""
    return [request.task.question(item, request.task) for item in items]
