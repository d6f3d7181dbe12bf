"""Perplexity, GPTQ convention: concatenate the corpus, tokenize once, cut non-overlapping windows
of `seqlen` tokens, exp(mean token NLL over all windows).

Every window is scored on its own (no carried context), so the first token of each window is never
predicted: `seqlen - 1` predictions per window. The stderr is the delta-method error of exp(mean
NLL) from the spread of the per-window mean NLLs.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from qwen_quant.cli_util import is_quiet
from qwen_quant.errors import UserError


def windows_of(token_ids: list[int], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] (the tail shorter than seqlen is dropped)."""
    n = len(token_ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the text has {len(token_ids)} tokens, fewer than one window of {seqlen}: "
                        f"give more text or a smaller --seqlen")
    return torch.tensor(token_ids[:n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1, device="cpu", desc: str | None = "ppl") -> list[float]:
    """Mean token NLL of each window (natural log); desc None shows no progress bar."""
    out: list[float] = []
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=is_quiet() or desc is None, leave=False)
    for start in range(0, windows.shape[0], max(1, batch_size)):
        ids = windows[start:start + batch_size].to(device)
        res = model(input_ids=ids)
        logits = (res.logits if hasattr(res, "logits") else res)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.extend(nll.view(ids.shape[0], -1).mean(dim=1).tolist())
        bar.update(ids.shape[0])
    bar.close()
    return out


def summarize(nlls: list[float], seqlen: int) -> dict:
    """Perplexity, its stderr, and the counts that make it reproducible."""
    n = len(nlls)
    mean = sum(nlls) / n
    ppl = math.exp(mean)
    if n > 1:
        var = sum((x - mean) ** 2 for x in nlls) / (n - 1)
        stderr = ppl * math.sqrt(var / n)  # d exp(m) = exp(m) dm
    else:
        stderr = float("nan")
    return {"value": ppl, "stderr": stderr, "n": n, "mean_nll": mean,
            "windows": n, "seqlen": seqlen, "tokens_scored": n * (seqlen - 1), "tokens": n * seqlen}


def perplexity(model, token_ids: list[int], seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, device="cpu", desc: str = "ppl") -> dict:
    windows = windows_of(token_ids, seqlen, max_windows)
    return summarize(window_nlls(model, windows, batch_size, device, desc), seqlen)
