"""Static, preallocated KV caches: one buffer per layer sized to context + new tokens, written in place.

`update(index, k, v, kv_len)` writes the new keys/values at their positions and returns the
cache up to `kv_len` (never the unwritten tail past it). `index` is the first position as an int
(prefill and the eager decode step: a copy into a slice view) or a device tensor of positions
(index_copy_, no host sync: what a captured CUDA graph replays). The buffers start at zero: a slot
that is read but masked (inside a captured graph's length bucket) holds finite values, never NaN
from uninitialized memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen_quant.errors import UserError

KV_CACHE_KINDS = ("auto", "bf16", "fp16", "fp32", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class KVCache(nn.Module):
    """Keys and values [B, H_kv, S, D] in a float dtype."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, index, k, v, kv_len: int):
        _write(self.k, index, k)
        _write(self.v, index, v)
        keys, values = self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        if keys.dtype != k.dtype:
            keys, values = keys.to(k.dtype), values.to(v.dtype)
        return keys, values

    def nbytes_per_token(self) -> int:
        """Bytes one position occupies over keys and values (for the roofline)."""
        b, h, _, d = self.k.shape
        return 2 * b * h * d * self.k.element_size()


class Int8KVCache(nn.Module):
    """Keys and values as int8 with one absmax scale per (batch, head, position): half the bytes of bf16."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int8, device=device), persistent=False)
            self.register_buffer(f"{name}_scale", torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device),
                                 persistent=False)

    def _quantize(self, x: torch.Tensor):
        # round the scale to its storage dtype first, so codes and the scale read back agree
        scale = (x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0).to(self.k_scale.dtype)
        return torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8), scale

    def update(self, index, k, v, kv_len: int):
        kq, ks = self._quantize(k)
        vq, vs = self._quantize(v)
        for buf, new in ((self.k, kq), (self.v, vq), (self.k_scale, ks), (self.v_scale, vs)):
            _write(buf, index, new)
        keys = self.k[:, :, :kv_len].to(k.dtype) * self.k_scale[:, :, :kv_len].to(k.dtype)
        values = self.v[:, :, :kv_len].to(v.dtype) * self.v_scale[:, :, :kv_len].to(v.dtype)
        return keys, values

    def nbytes_per_token(self) -> int:
        b, h, _, d = self.k.shape
        return 2 * b * h * (d + self.k_scale.element_size())


def _write(buf: torch.Tensor, index, new: torch.Tensor) -> None:
    """buf[:, :, positions] = new (cast to buf's dtype); index: the first position (int) or positions (tensor)."""
    if isinstance(index, int):
        buf.narrow(2, index, new.shape[2]).copy_(new)
    else:
        buf.index_copy_(2, index, new.to(buf.dtype))


def make_kv_cache(kind: str, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                  model_dtype: torch.dtype, device) -> nn.Module:
    """kind: "auto" (the model's dtype: bf16/fp16 on a GPU, fp32 for an fp32 model), "bf16", "fp16", "fp32", "int8"."""
    if kind not in KV_CACHE_KINDS:
        raise UserError(f"unknown KV cache {kind!r}; choose one of: {', '.join(KV_CACHE_KINDS)}")
    if kind == "int8":
        return Int8KVCache(batch_size, n_kv_heads, max_seq_len, head_dim, model_dtype, device)
    dtype = model_dtype if kind == "auto" else _DTYPES[kind]
    return KVCache(batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device)
