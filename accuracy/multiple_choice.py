"""Multiple-choice tasks scored by log-likelihood, with the prompts of the field's harness (lm-eval 0.4).

Each item becomes a `Question`: one (context, continuation) pair per choice. The prediction is the
choice with the highest log-likelihood (`accuracy`) or the highest log-likelihood per character of
the choice (`accuracy_norm`, reported where the harness reports acc_norm).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Sequence

from qwen_quant.errors import UserError
from qwen_quant.accuracy.scoring import CachedEncoder, Score, encode_pair, loglikelihoods

LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass
class Question:
    id: str
    contexts: list[str]  # one per choice (the same string except for WinoGrande)
    continuations: list[str]
    gold: int
    norm_lengths: list[int]  # characters of each choice, for acc_norm
    subject: str | None = None


def field(item, *names, default=None):
    """The first present attribute/key among `names` (items come as dataclasses or dicts)."""
    for name in names:
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if value is not None:
            return value
    return default


def _question_text(item) -> str:
    text = field(item, "question", "context", "query", "goal", "sentence")
    if text is None:
        raise UserError(f"item {field(item, 'id', default='?')} has no question text: check the task file")
    return str(text)


def _choices(item) -> list[str]:
    choices = field(item, "choices", "options", "endings")
    if not choices or len(choices) < 2:
        raise UserError(f"item {field(item, 'id', default='?')} has fewer than two choices: check the task file")
    return [str(c) for c in choices]


def _gold(item, n: int) -> int:
    gold = field(item, "answer_index", "gold", "label", "answer")
    if isinstance(gold, str) and gold.strip().upper() in LETTERS[:n]:
        gold = LETTERS.index(gold.strip().upper())
    try:
        gold = int(gold)
    except (TypeError, ValueError):
        raise UserError(f"item {field(item, 'id', default='?')} has no valid answer: check the task file") from None
    if not 0 <= gold < n:
        raise UserError(f"item {field(item, 'id', default='?')} answer {gold} is out of range: check the task file")
    return gold


# ---------------------------------------------------------------- prompt formats

def lettered_block(question: str, choices: Sequence[str]) -> str:
    """MMLU / C-Eval style: the question, lettered choices, then 'Answer:'."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def lettered_question(item, header: str, shots: Iterable = ()) -> Question:
    """5-shot (or given shots) lettered question; the continuations are ' A', ' B', ..."""
    choices = _choices(item)
    parts = [lettered_block(_question_text(s), _choices(s)) + " " + LETTERS[_gold(s, len(_choices(s)))]
             for s in shots]
    parts.append(lettered_block(_question_text(item), choices))
    context = header + "\n\n".join(parts)
    conts = [" " + LETTERS[i] for i in range(len(choices))]
    return Question(str(field(item, "id", default="")), [context] * len(choices), conts,
                    _gold(item, len(choices)), [1] * len(choices), field(item, "subject"))


def mmlu_header(subject: str | None) -> str:
    topic = (subject or "general knowledge").replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def qa_question(item) -> Question:
    """ARC / PIQA: 'Question: ...\\nAnswer:' followed by the text of each choice."""
    text = _question_text(item).strip()
    if not (text.startswith("Question:") and text.endswith("Answer:")):
        text = f"Question: {text}\nAnswer:"
    choices = _choices(item)
    return Question(str(field(item, "id", default="")), [text] * len(choices), [" " + c for c in choices],
                    _gold(item, len(choices)), [len(c) for c in choices])


def hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_question(item) -> Question:
    label = field(item, "activity_label")
    ctx_a, ctx_b = field(item, "ctx_a"), field(item, "ctx_b")
    if ctx_a is not None:
        context = f"{label}: {ctx_a} {str(ctx_b or '').capitalize()}" if label else f"{ctx_a} {ctx_b or ''}"
    else:
        context = _question_text(item)
    context = hellaswag_clean(context)
    choices = [hellaswag_clean(c) for c in _choices(item)]
    return Question(str(field(item, "id", default="")), [context] * len(choices), [" " + c for c in choices],
                    _gold(item, len(choices)), [len(c) for c in choices])


def winogrande_question(item) -> Question:
    """Partial scoring: the context differs per option (the blank filled in), the rest is scored."""
    sentence = _question_text(item)
    if "_" not in sentence:
        raise UserError(f"WinoGrande item {field(item, 'id', default='?')} has no '_' blank: check the task file")
    cut = sentence.index("_")
    options = _choices(item)
    rest = " " + sentence[cut + 1:].strip()
    return Question(str(field(item, "id", default="")), [sentence[:cut] + o for o in options],
                    [rest] * len(options), _gold(item, len(options)), [len(rest)] * len(options))


# ---------------------------------------------------------------- scoring and metrics

def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports them."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclasses.dataclass
class Graded:
    question: Question
    scores: list[Score]

    @property
    def correct(self) -> bool:
        lls = [s.logprob for s in self.scores]
        return max(range(len(lls)), key=lls.__getitem__) == self.question.gold

    @property
    def correct_norm(self) -> bool:
        lls = [s.logprob / max(1, n) for s, n in zip(self.scores, self.question.norm_lengths)]
        return max(range(len(lls)), key=lls.__getitem__) == self.question.gold


def score_questions(model, questions: Sequence[Question], encode: Callable[[str], list[int]],
                    prefix_token: int | None, batch_size: int, max_length: int, pad_id: int,
                    device="cpu", desc: str = "mc") -> list[Graded]:
    """Score every choice of every question in batches (choices of one question share a batch)."""
    cached = encode if isinstance(encode, CachedEncoder) else CachedEncoder(encode)
    requests, owners = [], []
    for qi, q in enumerate(questions):
        for ctx, cont in zip(q.contexts, q.continuations):
            requests.append(encode_pair(cached, ctx, cont, prefix_token))
            owners.append(qi)
    scores = loglikelihoods(model, requests, batch_size, max_length, pad_id, device, desc)
    per_question: list[list[Score]] = [[] for _ in questions]
    for qi, s in zip(owners, scores):
        per_question[qi].append(s)
    return [Graded(q, s) for q, s in zip(questions, per_question)]


def accuracy_metrics(graded: Sequence[Graded], with_norm: bool) -> dict[str, tuple[float, float, int]]:
    """metric -> (value in %, stderr in %, n)."""
    out = {}
    acc, err = mean_and_stderr([float(g.correct) for g in graded])
    out["accuracy"] = (100 * acc, 100 * err, len(graded))
    if with_norm:
        acc, err = mean_and_stderr([float(g.correct_norm) for g in graded])
        out["accuracy_norm"] = (100 * acc, 100 * err, len(graded))
    return out


def per_item(flags: Iterable[bool]) -> str:
    """Per-item correctness as a compact string ('1' right, '0' wrong) in item order, stored with each
    result so that two models scored on the same items can be compared pairwise (`paired_delta`)."""
    return "".join("1" if f else "0" for f in flags)


def paired_delta(a: str, b: str) -> tuple[float, float] | None:
    """(mean of b - a, its standard error) over the same items, in %; None unless both cover the same n >= 2.

    The pairs share each item's difficulty, so this error is smaller than either accuracy's own: it is
    the one that says whether two models on the same items really differ."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    mean, err = mean_and_stderr(diffs)
    return 100 * mean, 100 * err


def per_subject(graded: Sequence[Graded]) -> dict[str, dict]:
    """Accuracy per subject, and the macro average (mean over subjects) beside the micro one."""
    by: dict[str, list[float]] = {}
    for g in graded:
        by.setdefault(g.question.subject or "all", []).append(float(g.correct))
    return {s: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for s, v in sorted(by.items())}
