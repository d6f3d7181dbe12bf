"""The CPU backend: torch's own int4 kernel for decode, one dequantize + dense matmul for prefill.

Few rows (decode) and BF16 activations go to `aten._weight_int4pack_mm_for_cpu`, which reads the packed
4-bit weights directly (2.6-3x a BF16 matmul per call at batch 1 on a 2-core EPYC). Many rows (prefill)
dequantize the weight once per call and run the dense matmul: the int4 kernel's per-row cost is ~2.5x
BF16's, the dequantize costs a few rows' worth (KERNEL_MAX_ROWS below says where the two cross).

The kernel computes  w = (q - 8) * scale + zero  per (output row, group), in float32 from BF16 scale/zero,
for groups of 32/64/128/256 columns, K divisible by the group and N by 16. GPTQ's  w = (q - z) * s  maps to it
exactly with zero = (8 - z) * s. What the layer's own layout does not give the kernel is made to fit once, at
prepare time, without refusing a 4-bit layer:
  - a group the kernel lacks (-1 = one per row, 512, 1024, ...): the largest kernel group dividing it, scales
    repeated;
  - a partial last group (K = 576 at g128): K padded to a whole group with codes whose activations are zero
    (the call pads x with zeros, so the padding adds exactly nothing);
  - N not a multiple of 64: padded rows, sliced off the output;
  - classic act-order (g_idx not sorted): the columns sorted by group once, x gathered by the same order per
    call (act-order with static groups has sorted g_idx and needs nothing).
Bits other than 4 and groups below 32 (or not a multiple of 32) stay on the torch reference backend (supports()).

The packed layout is torch's, written by `_convert_weight_to_int4pack_for_cpu` and depending on the CPU
(AVX512: blocks of 64 rows; AVX2 and plain: 32). Prefill reads it back; `packed_layout()` finds which layout
this process uses by packing a probe and reading it back, so the backend reports itself unavailable rather
than compute wrong numbers if a torch release changes it.

After prepare the layer needs nothing else: QuantLinear can free the checkpoint tensors (keep_checkpoint=False)
so an Int4 model holds 4-bit codes, not 4-bit codes plus a copy.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from qwen_quant.kernels.torch_backend import true_zeros, unpack_rows

NAME = "cpu"
KERNEL_GROUPS = (256, 128, 64, 32)  # what aten._weight_int4pack_mm_for_cpu accepts
N_ALIGN = 64  # the largest row block of any packed layout: padding N to it leaves no partial block
# Above this many rows one dequantize + dense matmul beats the int4 kernel (1536 x 8960, one thread, bf16,
# AMD EPYC: kernel 0.31 ms per row; dense 0.12 ms per row + 12 ms to dequantize). `qwen-bench-kernels
# --device cpu` prints both paths by batch on the machine at hand.
KERNEL_MAX_ROWS = 64


def available() -> tuple[bool, str]:
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False, f"torch {torch.__version__} has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)"
    layout = packed_layout()
    if layout is None:
        return False, "this torch's packed int4 layout is not one this backend reads back (prefill could not dequantize)"
    block, order = layout
    return True, f"torch int4 CPU kernel ({torch.backends.cpu.get_cpu_capability()}, {block}-row {order} layout)"


def kernel_group(group_size: int) -> int | None:
    """The kernel group serving a checkpoint group: the largest kernel group dividing it (-1: 128)."""
    if group_size == -1:
        return 128
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


def supports(in_features: int, out_features: int, bits: int, group_size: int, desc_act: bool) -> bool:
    return bits == 4 and kernel_group(group_size) is not None


# ---- torch's packed layout, read back -------------------------------------------------------------
# (block B, order): rows in blocks of B; for each column k a block stores B/2 bytes whose low and high nibbles
# hold rows (j, j + B/2) ("halves") or (2j, 2j + 1) ("pairs"). AVX512: (64, halves); AVX2: (32, halves);
# no vector ISA: (32, pairs), as torch 2.13 writes them.
LAYOUTS = [(64, "halves"), (32, "halves"), (32, "pairs"), (64, "pairs"), (16, "pairs")]


def unpack_into(packed: torch.Tensor, out: torch.Tensor, layout: tuple[int, str]) -> torch.Tensor:
    """Packed uint8 [n, k/2] -> the codes written into `out` [k, n] (any dtype), column k = input feature k."""
    block, order = layout
    n, k = packed.shape[0], packed.shape[1] * 2
    raw = packed.view(n // block, k, block // 2).permute(1, 0, 2)  # [k, blocks, B/2]
    rows = out.view(k, n // block, block)
    low, high = (rows[..., : block // 2], rows[..., block // 2:]) if order == "halves" else \
        (rows[..., 0::2], rows[..., 1::2])
    low.copy_(raw & 15)
    high.copy_(raw >> 4)
    return out


@functools.lru_cache(maxsize=None)
def packed_layout() -> tuple[int, str] | None:
    """The layout this process's kernel packs into, or None: found by reading back packed probes."""
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen) for n, k in ((128, 64), (192, 256))]
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(p, 1) for p in probes]
    for layout in LAYOUTS:
        if all(p.shape[0] % layout[0] == 0 and
               torch.equal(unpack_into(pk, torch.empty(p.shape[1], p.shape[0], dtype=torch.int32), layout).t(), p)
               for p, pk in zip(probes, packed)):
            return layout
    return None


# ---- prepare: the checkpoint layer -> what the kernel and the dequantize read ---------------------
def prepare(qweight, qzeros, scales, g_idx, bits, group_size, v1: bool = True) -> dict:
    k, n = g_idx.shape[0], scales.shape[1]
    codes = unpack_rows(qweight, bits, k)  # [K, N] int32
    zeros = true_zeros(qzeros, bits, n, v1)  # [G, N]
    group = k if group_size == -1 else group_size
    g_idx = g_idx.long()
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):  # classic act-order: sort columns by group, gather x per call
        perm = torch.argsort(g_idx, stable=True)
        codes, g_idx = codes[perm], g_idx[perm]
    if not torch.equal(g_idx, torch.arange(k) // group):
        raise ValueError("g_idx does not give every group its full size; use the torch backend")
    kgroup = kernel_group(group_size)
    k_pad, n_pad = math.ceil(k / kgroup) * kgroup, math.ceil(n / N_ALIGN) * N_ALIGN
    # one (scale, zero) per kernel group: kernel group j lies inside checkpoint group j*kgroup // group
    source_group = torch.arange(k_pad // kgroup) * kgroup // group
    s = F.pad(scales[source_group].float(), (0, n_pad - n), value=1.0)  # [Gk, Np]
    z = F.pad(zeros[source_group], (0, n_pad - n), value=8)
    codes = F.pad(codes.t(), (0, k_pad - k, 0, n_pad - n), value=8).contiguous()  # [Np, Kp]
    return {
        "packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
        # the kernel's BF16 scale and zero: w = (q - 8) * s + (8 - z) * s
        "scale_zero": torch.stack([s, (8 - z) * s], -1).to(torch.bfloat16).contiguous(),
        # the dequantize's, in the checkpoint's precision: [Gk, 1, Np]
        "scales": s.to(scales.dtype).unsqueeze(1),
        "zeros": z.to(torch.uint8).unsqueeze(1),
        "perm": perm,
        "group": kgroup,
        "out_features": n,
    }


_workspace = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer for the dequantized weight: a fresh 30 MB tensor per call costs more in page faults
    than the dequantize itself. One per thread and dtype; the caller is done with it before the next call."""
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable both inside and outside inference mode
            buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize(state: dict, dtype: torch.dtype) -> torch.Tensor:
    """The padded dense weight, transposed: [Kp, Np] in `dtype` (a view of a reused buffer).

    (q - z) * s in `dtype` from the checkpoint's scales: exact for float32 (as the torch backend), one rounding
    of s and one of the product for 16-bit dtypes."""
    packed, group = state["packed"], state["group"]
    n_pad, k_pad = packed.shape[0], packed.shape[1] * 2
    w = unpack_into(packed, _scratch(k_pad * n_pad, dtype), packed_layout())
    w.view(k_pad // group, group, n_pad).sub_(state["zeros"].to(dtype)).mul_(state["scales"].to(dtype))
    return w.view(k_pad, n_pad)


def matmul(x2d: torch.Tensor, state: dict) -> torch.Tensor:
    x = x2d if state["perm"] is None else x2d.index_select(1, state["perm"])
    k_pad = state["packed"].shape[1] * 2
    if k_pad > x.shape[1]:
        x = F.pad(x, (0, k_pad - x.shape[1]))
    if x.dtype == torch.bfloat16 and x.shape[0] <= KERNEL_MAX_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), state["packed"], state["group"],
                                                        state["scale_zero"])
    else:
        y = x @ dequantize(state, x.dtype)
    return y[:, : state["out_features"]]
