"""The Triton backend: fused dequantize + matmul straight from the GPTQ layout.

One kernel, two shapes of launch (picked from a small fixed table keyed by shape, no autotuning
at run time, so the first call is cheap and the forward stays CUDA-graph capturable):
- GEMV (1-16 rows): split-K. Each program reads a K-slice of a column tile; partial sums go to an
  fp32 buffer [split, M, N] and one torch sum reduces them (deterministic, unlike atomics).
- GEMM (more rows, prefill): tiled, no split; each program owns a [BLOCK_M, BLOCK_N] output tile.

The weight is read in its checkpoint layout: qweight words [K*b/32, N] are contiguous along N, so a
row of a tile is one coalesced (16-byte per thread) load. A tile of words holds 32/b rows of K per
word; value j of every word is a strided slice of K, so the kernel does 32/b small dots per tile
instead of re-reading words. Act-order: the input features are permuted once at load so groups are
contiguous; at run time the activations are permuted with one gather.
"""

from __future__ import annotations

import functools
import os

import torch

NAME = "triton"
TRITON_BITS = (2, 4, 8)  # 3-bit values straddle words; the torch backend covers them

try:  # triton is optional (CPU installs without it use the torch backend)
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def available() -> tuple[bool, str]:
    if triton is None:
        return False, _IMPORT_ERROR
    if _interpreting():
        return True, "triton interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
    return True, "triton on CUDA"


def supports(in_features: int, out_features: int, bits: int, group_size: int, desc_act: bool) -> bool:
    return bits in TRITON_BITS


def words_per_tile(bits: int) -> int:
    """Rows of packed words per K tile: 16 so each of the 32/b dots has K >= 16 (tensor-core minimum)."""
    return 16


if triton is not None:

    @triton.jit
    def _dequant_matmul_kernel(
        x_ptr, qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr,
        M, N, K, k_words, words_per_split, group_size,
        stride_xm, stride_qw, stride_s, stride_os, stride_om,
        BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
        ONE_GROUP_PER_TILE: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_begin = pid_k * words_per_split
        w_end = tl.minimum(w_begin + words_per_split, k_words)
        for w0 in range(w_begin, w_end, BLOCK_KW):
            offs_w = w0 + tl.arange(0, BLOCK_KW)
            w_ok = offs_w < w_end
            q = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                        mask=w_ok[:, None] & n_ok[None, :], other=0)
            if ONE_GROUP_PER_TILE:  # groups contiguous and tile-aligned: one scale row per tile
                g = (w0 * PER) // group_size
                s = tl.load(scales_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                z = tl.load(zeros_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            for j in tl.static_range(PER):
                k = offs_w * PER + j
                k_ok = w_ok & (k < K)
                if not ONE_GROUP_PER_TILE:
                    gk = tl.load(gidx_ptr + k, mask=k_ok, other=0)
                    sz_ok = k_ok[:, None] & n_ok[None, :]
                    s = tl.load(scales_ptr + gk[:, None] * stride_s + offs_n[None, :], mask=sz_ok, other=0.0).to(tl.float32)
                    z = tl.load(zeros_ptr + gk[:, None] * stride_s + offs_n[None, :], mask=sz_ok, other=0.0).to(tl.float32)
                codes = ((q >> (j * BITS)) & MASK).to(tl.float32)
                w = (codes - z) * s
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if DOT_FP32:  # the interpreter's low-precision dots are unreliable; fp32 inputs stay fp32
                    acc += tl.dot(xj.to(tl.float32), w, input_precision="ieee")
                else:
                    acc += tl.dot(xj, w.to(xj.dtype))
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [K, N] (bits 2/4/8) -> qweight int32 [ceil(K*b/32), N], the GPTQ layout, on codes' device."""
    per_word = 32 // bits
    k = codes.shape[0]
    pad = (-k) % per_word
    c = codes.to(torch.int64)
    if pad:
        c = torch.cat([c, c.new_zeros(pad, c.shape[1])])
    c = c.reshape(-1, per_word, c.shape[1])
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64).view(1, per_word, 1)
    words = (c << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


# Benchmarks/sweeps may override entries of the table (e.g. {"BLOCK_N": 256, "split": 8}); never set in use.
LAUNCH_OVERRIDE: dict = {}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (the interpreter pretends to have 4)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 4


def launch_config(m: int, k: int, n: int, bits: int, sms: int) -> dict:
    """The fixed tuning table: GEMV split-K for <= 16 rows, tiled GEMM above."""
    block_kw = words_per_tile(bits)
    k_words = -(-k * bits // 32)
    tiles_k = -(-k_words // block_kw)
    if m <= 16:
        block_m, block_n, warps = 16, 128 if n >= 4096 else 64, 4
        # enough programs in flight to saturate DRAM: about 4 per SM, by splitting K
        tiles_n = -(-n // block_n)
        split = 1
        while split * 2 <= tiles_k and tiles_n * split * 2 <= 4 * sms:
            split *= 2
    else:
        block_m = 32 if m <= 32 else 64
        block_n, warps, split = 128, 4 if m <= 32 else 8, 1
    if _interpreting() and n >= 256:
        block_n = 256  # the CPU interpreter pays per program: fewer, wider tiles (same kernel code)
    block_m = LAUNCH_OVERRIDE.get("BLOCK_M", block_m)
    block_n = LAUNCH_OVERRIDE.get("BLOCK_N", block_n)
    warps = LAUNCH_OVERRIDE.get("num_warps", warps)
    split = min(LAUNCH_OVERRIDE.get("split", split), tiles_k)
    words_per_split = -(-tiles_k // split) * block_kw
    split = -(-k_words // words_per_split)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_KW": block_kw, "split": split,
            "words_per_split": words_per_split, "num_warps": warps}


def prepare(qweight, qzeros, scales, g_idx, bits, group_size, v1: bool = True) -> dict:
    """Once at load: permute act-order rows so groups are contiguous; zeros unpacked to scales' dtype."""
    from qwen_quant.kernels.torch_backend import true_zeros, unpack_rows

    k, n = g_idx.shape[0], qweight.shape[1]
    g_idx = g_idx.to(qweight.device).long()
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):  # act-order: sort rows by group
        perm = torch.argsort(g_idx, stable=True)
        qweight = pack_rows(unpack_rows(qweight, bits, k)[perm], bits)
        g_idx = g_idx[perm]
    block_k = words_per_tile(bits) * 32 // bits
    eff_group = k if group_size == -1 else group_size
    expected = torch.arange(k, device=g_idx.device) // eff_group
    one_group = eff_group % block_k == 0 and bool(torch.equal(g_idx, expected))
    return {
        "qweight": qweight.contiguous(),
        "scales": scales.contiguous(),
        "zeros": true_zeros(qzeros, bits, n, v1).to(scales.dtype).contiguous(),  # small ints: exact in fp16
        "g_idx": g_idx.to(torch.int32).contiguous(),
        "perm": perm,
        "bits": bits, "in_features": k, "out_features": n,
        "group_size": eff_group, "one_group_per_tile": one_group,
    }


def matmul(x2d: torch.Tensor, state: dict) -> torch.Tensor:
    if state["perm"] is not None:
        x2d = x2d.index_select(1, state["perm"])
    x2d = x2d.contiguous()
    m, k, n, bits = x2d.shape[0], state["in_features"], state["out_features"], state["bits"]
    cfg = launch_config(m, k, n, bits, device_sms(x2d.device))
    split = cfg["split"]
    if split == 1:
        out = torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    else:
        out = torch.empty(split, m, n, device=x2d.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    qw = state["qweight"]
    _dequant_matmul_kernel[grid](
        x2d, qw, state["scales"], state["zeros"], state["g_idx"], out,
        m, n, k, qw.shape[0], cfg["words_per_split"], state["group_size"],
        x2d.stride(0), qw.stride(0), state["scales"].stride(0), m * n if split > 1 else 0, n,
        BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"],
        ONE_GROUP_PER_TILE=state["one_group_per_tile"], DOT_FP32=_interpreting() or x2d.dtype == torch.float32,
        num_warps=cfg["num_warps"],
    )
    if split > 1:
        out = out.sum(dim=0).to(x2d.dtype)
    return out
