"""Fused backends (Triton under TRITON_INTERPRET=1 on the CPU; CUDA C++ and Triton on a GPU when present)
against a float64 dequantize-then-matmul reference on fresh random inputs.

Tolerance, from the activation dtype's unit roundoff eps (fp16 2^-11, bf16 2^-8):
  - the output is rounded once to the activation dtype:            eps * |y|
  - on a GPU the dequantized weight is rounded to the activation dtype before the tensor-core dot,
    so each product carries a relative error <= eps; summed over K these are independent, giving
    about eps * sqrt(sum_k (x_k w_kn)^2); we allow 4x that (4 sigma).
  tol = 2 * eps * max|y_ref| + 4 * eps * max_n ||x * w_n||_2
The interpreter path dots in float32, so it only sees the output rounding.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from qwen_quant.kernels import format as fmt  # noqa: E402
from qwen_quant.kernels import triton_backend  # noqa: E402
from qwen_quant.kernels.check import random_layer  # noqa: E402

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_and_tolerance(layer, x):
    w = fmt.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.in_features,
                       v1=layer.checkpoint_format == "gptq", dtype=torch.float64).to(x.device)
    x64 = x.to(torch.float64)
    y = x64 @ w.T
    if layer.bias is not None:
        y = y + layer.bias.to(torch.float64)
    eps = EPS[x.dtype]
    products = (x64[:, None, :] * w[None, :, :]).pow(2).sum(-1).sqrt().max().item()
    return y, 2 * eps * y.abs().max().item() + 4 * eps * products


CASES = [  # (K, N, bits, group_size, act_order, bias, format) - small: the interpreter is slow
    (576, 72, 4, 128, False, True, "gptq"),     # partial last group
    (256, 40, 4, 32, True, False, "gptq"),      # act-order, groups smaller than a tile
    (384, 64, 4, 64, True, True, "gptq_v2"),    # act-order, v2 zeros (zero 0 allowed)
    (200, 48, 4, -1, False, False, "gptq"),     # one group, K not a multiple of the tile
    (512, 32, 2, 128, True, False, "gptq"),
    (192, 40, 8, 64, False, True, "gptq_v2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}-N{}-b{}-g{}-act{}-bias{}-{}".format(*c))
def test_fused_backend_matches_float64_reference(backend, case):
    gen = torch.Generator().manual_seed(sum(case[:4]))
    layer = random_layer(*case, gen).to(DEVICE)
    mod = __import__(f"qwen_quant.kernels.{backend}_backend", fromlist=["supports"])
    if not mod.supports(case[0], case[1], case[2], case[3], case[4]):
        pytest.skip(f"{backend} does not claim this shape (auto routes it elsewhere; tested in test_backends)")
    layer.set_backend(backend)
    rows_list = (1, 3, 16, 33) if DEVICE == "cuda" else (1, 16, 33)
    for dtype in (torch.float16, torch.bfloat16):
        for rows in rows_list:
            x = torch.randn(rows, case[0], generator=gen).to(dtype).to(DEVICE)
            y = layer(x)
            ref, tol = reference_and_tolerance(layer, x)
            assert y.dtype == dtype and y.shape == ref.shape
            err = (y.to(torch.float64) - ref).abs().max().item()
            assert err <= tol, f"{backend} rows={rows} {dtype}: max error {err:.3g} > {tol:.3g}"


def test_act_order_is_permuted_once_at_load():
    gen = torch.Generator().manual_seed(5)
    layer = random_layer(256, 32, 4, 64, True, False, "gptq", gen).set_backend("triton")
    (_, name, _, state), = layer._plan
    assert name == "triton" and state["perm"] is not None
    assert bool((state["g_idx"][1:] >= state["g_idx"][:-1]).all())  # groups now contiguous
    assert state["one_group_per_tile"] is False  # 64-row groups are smaller than the 128-row tile
    plain = random_layer(576, 32, 4, 128, False, False, "gptq", gen).set_backend("triton")
    assert plain._plan[0][3]["perm"] is None and plain._plan[0][3]["one_group_per_tile"]
    assert plain._plan[0][3]["qweight"] is plain.qweight  # the checkpoint buffer is read in place


def test_three_bit_is_not_claimed_by_triton():
    assert not triton_backend.supports(256, 64, 3, 128, False)
    assert triton_backend.supports(256, 64, 4, 128, True)


def test_launch_table_splits_k_for_decode_and_tiles_for_prefill():
    h100_sms = 132
    decode = triton_backend.launch_config(1, 4096, 4096, 4, h100_sms)
    prefill = triton_backend.launch_config(128, 4096, 4096, 4, h100_sms)
    assert decode["split"] > 1 and decode["BLOCK_M"] == 16
    assert prefill["split"] == 1 and prefill["BLOCK_M"] == 64
    words = 4096 * 4 // 32
    assert decode["split"] * decode["words_per_split"] >= words > (decode["split"] - 1) * decode["words_per_split"]
