"""How close a decode number is to the hardware's limit.

Decoding one token at batch 1 must read every weight once (at its stored precision: Int4 = packed
codes + scales + zeros) plus the KV cache written so far. Those bytes divided by the device's copy
bandwidth, measured in the same run, give the ceiling; achieved GB/s = bytes/token x tokens/s.
"""

from __future__ import annotations

import torch

GB = 1e9


def _quant_states(mod, decode: bool) -> list[dict]:
    """The prepared kernel states of a QuantLinear: all of them (resident), or the first one (what a
    batch-1 decode step reads: the plan's smallest-row entry)."""
    plan = getattr(mod, "_plan", None) or []
    states = [entry[-1] for entry in plan if entry[-1] is not None]
    return states[:1] if decode else states


def _state_tensors(state) -> list:
    """Tensors held by a backend state: a dict's values or an object's attributes."""
    values = state.values() if isinstance(state, dict) else vars(state).values() if hasattr(state, "__dict__") else ()
    return [t for t in values if isinstance(t, torch.Tensor)]


def _tensors(model, decode: bool):
    """Every parameter, buffer and prepared Int4 kernel tensor, each storage counted once."""
    seen = set()
    for mod in model.modules():
        quant = type(mod).__name__ == "QuantLinear"
        own = list(mod.parameters(recurse=False))
        own_buffers = list(mod.buffers(recurse=False))
        states = _quant_states(mod, decode) if quant else []
        if quant and decode and states:
            own_buffers = [b for b in own_buffers if b is getattr(mod, "bias", None)]
        own += own_buffers + [t for st in states for t in _state_tensors(st)]
        for t in own:
            if t is None or t.numel() == 0:
                continue
            key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                yield t


def weight_bytes(model) -> int:
    """Resident weight bytes: parameters, buffers and prepared Int4 kernel tensors, tied ones once."""
    return sum(t.numel() * t.element_size() for t in _tensors(model, decode=False))


def decode_weight_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads, at their stored precision (Int4: what the kernel
    reads), minus the input embedding table (one row per token) unless it is also the output head."""
    total = sum(t.numel() * t.element_size() for t in _tensors(model, decode=True))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        w = embed.weight
        tied = head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == w.data_ptr()
        if not tied:
            total -= w.numel() * w.element_size()
    return total


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def kv_bytes_per_position(config, element_size: int, batch: int = 1) -> int:
    """Keys + values of one token position over all layers (what the HF cache holds per token)."""
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head")
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    hidden = _cfg(config, "hidden_size", "n_embd")
    head_dim = _cfg(config, "head_dim", "kv_channels", default=hidden // heads)
    return 2 * layers * kv_heads * head_dim * element_size * batch


def mean_kv_positions(context_tokens: int, new_tokens: int) -> float:
    """Average cache length read by the decode steps (tokens 2..n attend to context + k - 1 positions)."""
    if new_tokens < 2:
        return float(context_tokens)
    return context_tokens + new_tokens / 2


def decode_bytes_per_token(decode_weights: int, kv_per_position: int, context_tokens: int,
                           new_tokens: int) -> float:
    return decode_weights + kv_per_position * mean_kv_positions(context_tokens, new_tokens)


def roofline(bytes_per_token: float | None, decode_tokens_per_s: float | None,
             bandwidth_gbps: float | None) -> dict:
    """achieved GB/s, ceiling tok/s and % of roofline; `over_100` flags an impossible measurement."""
    out = {"bytes_per_token": bytes_per_token, "achieved_gbps": None, "ceiling_tokens_per_s": None,
           "roofline_pct": None, "roofline_over_100": None}
    if not bytes_per_token or not decode_tokens_per_s:
        return out
    out["achieved_gbps"] = bytes_per_token * decode_tokens_per_s / GB
    if bandwidth_gbps:
        out["ceiling_tokens_per_s"] = bandwidth_gbps * GB / bytes_per_token
        out["roofline_pct"] = 100.0 * out["achieved_gbps"] / bandwidth_gbps
        out["roofline_over_100"] = out["roofline_pct"] > 100.0
    return out


def measure_copy_bandwidth(device: str, n_bytes: int | None = None, repeats: int = 10) -> dict:
    """Device copy bandwidth, counting bytes read + written (see kernels/bandwidth.py for the method)."""
    from qwen_quant.kernels.bandwidth import copy_bandwidth_gbs

    n_bytes = n_bytes or (2 ** 30 if device.startswith("cuda") else 2 ** 28)
    gbs = copy_bandwidth_gbs(device, n_bytes, repeats)
    return {"device": device, "bytes": n_bytes, "method": "copy, read+write bytes, best of %d" % repeats,
            "bandwidth_gbps": gbs * 1e9 / GB}
