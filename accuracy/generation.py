"""Generation tasks: GSM8K (few-shot, greedy, last number) and HumanEval (greedy pass@1, sandboxed)."""

from __future__ import annotations

import inspect
import re
from typing import Callable, Sequence

import torch

from qwen_quant.accuracy.sandbox import run_program

GSM8K_STOPS = ("\n\nQuestion:", "\n\n", "Question:")
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, decode: Callable[[list[int]], str],
                    stop_strings: Sequence[str] = (), eos_id: int | None = None, device="cpu") -> str:
    """Greedy continuation of one prompt with the KV cache; stops at EOS or the first stop string
    (the stop string itself is cut off)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    generated: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if eos_id is not None and token == eos_id:
            break
        generated.append(token)
        text = decode(generated)
        cut = [text.index(s) for s in stop_strings if s in text]
        if cut:
            return text[:min(cut)]
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **_cache_kwargs(model, out))
    return text


def _cache_kwargs(model, out) -> dict:
    """Hand the KV cache back under the name this transformers version uses (`cache` from 5.2x on,
    `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    if cache is not None and "cache" in inspect.signature(model.forward).parameters:
        return {"cache": cache}
    return {"past_key_values": getattr(out, "past_key_values", None) if cache is None else cache}


# ---------------------------------------------------------------- GSM8K

def extract_last_number(text: str) -> str | None:
    """The final number in a completion, normalised ("1,234." -> "1234", "$5" -> "5"); None if none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "").replace("$", "").rstrip(".")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def numbers_equal(predicted: str | None, gold: str | float | int) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(str(gold).replace(",", ""))) < 1e-6
    except ValueError:
        return False


# ---------------------------------------------------------------- HumanEval

def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs: the prompt, the model's body, the tests, and the check call."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def humaneval_passes(prompt: str, completion: str, test: str, entry_point: str, timeout_s: float = 10.0):
    return run_program(humaneval_program(prompt, completion, test, entry_point), timeout_s=timeout_s)
