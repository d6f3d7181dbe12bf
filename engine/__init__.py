"""The generation engines behind qwen-profile's --engine and qwen_quant.generate.

Both are constructed as `Engine(model, max_seq_len, device, kv_cache=..., batch_size=...)` and offer
`timed_generate(input_ids[B, T], new_tokens) -> {"prefill_s", "token_s", "tokens"}` with exact lengths
(EOS ignored) and greedy decoding (docs/ARCHITECTURE.md):
- "hf": transformers `generate` with its default cache (the seed's method), engine/hf.py;
- "fast": our compact model, static KV cache and CUDA graphs (engine/generate.py), engine/fast.py.
"""

from __future__ import annotations

from qwen_quant.engine.fast import FastEngine
from qwen_quant.engine.hf import HFEngine
from qwen_quant.errors import UserError

ENGINES = {"hf": HFEngine, "fast": FastEngine}


def parse_engines(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ENGINES]
    if not names or unknown:
        raise UserError(f"unknown engine {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    return names


def make_engine(name: str, model, max_seq_len: int, device: str, kv_cache: str = "auto", batch: int = 1,
                owns_model: bool = False):
    """owns_model: the caller never runs `model` itself again (the fast engine then keeps one copy of the weights)."""
    parse_engines(name)
    extra = {"owns_model": owns_model} if name == "fast" else {}
    return ENGINES[name](model, max_seq_len, device, kv_cache=kv_cache, batch_size=batch, **extra)


def total_seconds(result: dict) -> float:
    """Total generate time: the engine's own measurement when it gives one, else prefill + decode."""
    if result.get("total_s") is not None:
        return float(result["total_s"])
    return float(result["prefill_s"]) + float(sum(result["token_s"]))
