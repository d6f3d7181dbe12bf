"""Log-likelihood of continuations given contexts, batched.

A request is (context_ids, continuation_ids). Rows are `context + continuation` minus the last
token; the log-probabilities of the continuation tokens are read off one forward pass. Requests
that share a context (the choices of one question) go into the same batch, rows are right-padded
with an attention mask, and padding never enters a score.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from qwen_quant.cli_util import is_quiet


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | prefix), natural log
    greedy: bool  # every continuation token was the argmax
    tokens: int  # continuation length in tokens


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_token: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way the field's harness splits them.

    Trailing spaces of the context move to the continuation, the pair is tokenized whole and the
    continuation is what follows the context's own tokens, so a word is never split differently
    from how the model would see it in running text.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = encode(context + continuation)
    context_ids = encode(context) if context else []
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        if prefix_token is None:
            raise ValueError("an empty context needs a prefix token (the tokenizer's BOS/EOS id)")
        context_ids = [prefix_token]
    return context_ids, continuation_ids


class CachedEncoder:
    """Tokenize each distinct string once (few-shot prefixes repeat across thousands of requests)."""

    def __init__(self, encode: Callable[[str], list[int]]):
        self._encode = functools.lru_cache(maxsize=65536)(lambda s: tuple(encode(s)))

    def __call__(self, text: str) -> list[int]:
        return list(self._encode(text))


def _groups_by_context(requests: Sequence[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Indices of consecutive requests that share a context, kept together in one batch."""
    groups: list[list[int]] = []
    for i, (ctx, _) in enumerate(requests):
        if groups and list(requests[groups[-1][0]][0]) == list(ctx):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclasses.dataclass
class _Row:
    """One row of a forward pass and the requests read off it: (request index, end position)."""
    ids: list[int]
    reads: list[tuple[int, int]]


def _rows(requests, max_length: int) -> list[list[_Row]]:
    """Rows to run. Choices of one context that are single tokens (' A', ' B' ...) share ONE row:
    the context's last position predicts every one of them; other requests get a row each.
    Returns the rows per context group."""
    rows = []
    for group in _groups_by_context(requests):
        if len(group) > 1 and all(len(requests[i][1]) == 1 for i in group):
            ids = list(requests[group[0]][0])[-max_length:]
            rows.append([_Row(ids, [(i, len(ids)) for i in group])])
            continue
        rows.append([])
        for i in group:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError("a continuation must have at least one token")
            if len(cont) > max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit in {max_length}")
            ids = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
            rows[-1].append(_Row(ids, [(i, len(ids))]))
    return rows


def _batches(groups: list[list[_Row]], batch_size: int) -> list[list[_Row]]:
    """Rows into batches of about `batch_size`: a context's rows stay together, longest groups first
    (similar lengths in a batch, less padding)."""
    ordered = sorted(groups, key=lambda g: max(len(r.ids) for r in g), reverse=True)
    batches, current = [], []
    for g in ordered:
        if current and len(current) + len(g) > batch_size:
            batches.append(current)
            current = []
        current.extend(g)
    if current:
        batches.append(current)
    return batches


def _logits(model, input_ids, attention_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                   max_length: int = 2048, pad_id: int = 0, device: str | torch.device = "cpu",
                   desc: str = "scoring") -> list[Score]:
    """Score every (context_ids, continuation_ids) request; the order of the result is the input's.

    Rows longer than `max_length` lose tokens from the left of the context (the continuation is
    always scored whole). Rows are right-padded; causal attention keeps padding out of every score.
    """
    results: list[Score | None] = [None] * len(requests)
    rows = _rows(requests, max_length)
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=is_quiet() or desc is None, leave=False)
    for batch in _batches(rows, max(1, batch_size)):
        width = max(len(row.ids) for row in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, :len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            mask[r, :len(row.ids)] = 1
        logprobs = torch.log_softmax(_logits(model, ids.to(device), mask.to(device)).float(), dim=-1)
        for r, row in enumerate(batch):
            for i, end in row.reads:
                cont = requests[i][1]
                n = len(cont)
                targets = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                window = logprobs[r, end - n:end]  # the positions that predict the continuation
                token_lp = window.gather(-1, targets[:, None]).squeeze(-1)
                results[i] = Score(float(token_lp.sum()), bool((window.argmax(-1) == targets).all()), n)
                bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]
