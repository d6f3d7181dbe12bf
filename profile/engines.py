"""Generation engines by name. Each one is constructed as `Engine(model, max_seq_len, device, kv_cache)`
and offers `timed_generate(input_ids[B, T], new_tokens) -> {"prefill_s", "token_s", "tokens"}` with
exact lengths (EOS ignored) and greedy decoding (docs/CONTRACTS.md). Engines import lazily, so a
missing one fails only when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

from qwen_quant.errors import UserError

ENGINES = {
    "hf": ("qwen_quant.profile.hf_engine", "HFEngine"),
    "fast": ("qwen_quant.profile.fast.engine", "FastEngine"),
}


def parse_engines(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError(f"--engine needs one of {', '.join(ENGINES)}")
    for n in names:
        check_engine(n)
    return names


def check_engine(name: str) -> None:
    """Fail early (in the parent, before any cell runs) for an unknown or not-yet-installed engine."""
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    module, _ = ENGINES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise UserError(f"engine {name!r} is not available in this install ({module} is missing); use --engine hf")


def make_engine(name: str, model, max_seq_len: int, device: str, kv_cache: str = "auto", batch: int = 1):
    check_engine(name)
    module, cls_name = ENGINES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    extra = {"batch_size": batch} if "batch_size" in inspect.signature(cls).parameters else {}
    return cls(model, max_seq_len, device, kv_cache=kv_cache, **extra)


def total_seconds(result: dict) -> float:
    """Total generate time: the engine's own measurement when it gives one, else prefill + decode."""
    if result.get("total_s") is not None:
        return float(result["total_s"])
    return float(result["prefill_s"]) + float(sum(result["token_s"]))
