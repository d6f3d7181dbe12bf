"""The CPU backend (torch's int4 kernel for few rows, dequantize + dense matmul for many) against float64.

Tolerance: a 16-bit output is one rounding of a float32 sum whose weights were rounded once (bf16 scales in the
kernel, the activation dtype's in the dequantize path): the harness' 2 output ulps of max|y|, with slack 2 for
bf16 (scale rounding, 2^-9 relative, on top). float32 activations take the dequantize path with the checkpoint's
scales: the torch backend's numbers to float32 summation noise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.kernels import cpu_backend
from qwen_quant.kernels.quant_linear import QuantLinear
from test_quant_linear import assert_close_to_reference, make_layer

pytestmark = pytest.mark.skipif(not cpu_backend.available()[0], reason=cpu_backend.available()[1])

CASES = [  # (K, N, bits, group_size, act_order, bias, format): every way a 4-bit layer departs from the kernel's
    (576, 136, 4, 128, False, True, "gptq"),      # partial last group; N not a multiple of 64 (or 16)
    (256, 72, 4, 32, True, False, "gptq"),        # classic act-order: x gathered
    (320, 40, 4, 64, True, True, "gptq_v2"),      # act-order + partial group, v2 zeros (0 allowed)
    (200, 48, 4, -1, False, False, "gptq"),       # one group per row: 128-groups, scales repeated, K padded
    (1024, 64, 4, 512, True, False, "gptq"),      # a group the kernel lacks: served by 256-groups
    (1536, 256, 4, 128, False, True, "gptq"),     # a Qwen2.5-1.5B k/v shape, no padding at all
]
ROWS = (1, 3, cpu_backend.KERNEL_MAX_ROWS, cpu_backend.KERNEL_MAX_ROWS + 1, 130)  # both paths, both sides


@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}-N{}-b{}-g{}-act{}-bias{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_backend_matches_float64_reference(case, dtype):
    gen = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    layer = make_layer(*case, gen, backend="cpu")
    assert layer.backend == "cpu"
    for rows in ROWS:
        x = torch.randn(rows, case[0], generator=gen).to(dtype)
        assert_close_to_reference(layer, x, slack=2.0 if dtype == torch.bfloat16 else 1.0)
    assert_close_to_reference(layer, torch.randn(2, 5, case[0], generator=gen).to(dtype), slack=2.0)


def test_float32_activations_give_the_torch_backends_numbers():
    gen = torch.Generator().manual_seed(3)
    layer = make_layer(576, 136, 4, 128, True, True, "gptq", gen)
    x = torch.randn(70, 576, generator=gen)
    want = layer.set_backend("torch")(x)
    got = layer.set_backend("cpu")(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_auto_on_cpu_takes_the_kernel_for_4_bits_and_the_reference_path_otherwise():
    assert QuantLinear.random(128, 64, group_size=32).set_backend("auto").backend == "cpu"
    assert QuantLinear.random(128, 64, group_size=-1).set_backend("auto").backend == "cpu"
    assert QuantLinear.random(128, 64, bits=3, group_size=32).set_backend("auto").backend == "torch"
    assert QuantLinear.random(128, 64, bits=8, group_size=32).set_backend("auto").backend == "torch"
    assert QuantLinear.random(128, 64, group_size=16).set_backend("auto").backend == "torch"
    with pytest.raises(UserError) as info:
        QuantLinear.random(128, 64, bits=8, group_size=32).set_backend("cpu")
    assert "\n" not in str(info.value) and "--backend auto" in str(info.value)


def test_irregular_groups_fall_back_to_torch_under_auto_and_are_one_line_errors_when_forced():
    gen = torch.Generator().manual_seed(4)
    layer = make_layer(256, 64, 4, 64, False, False, "gptq", gen)
    layer.g_idx.copy_(torch.arange(256) % 3)  # groups of 86/85/85 rows, not 64: no kernel group fits them
    assert layer.set_backend("auto").backend == "torch"
    with pytest.raises(UserError) as info:
        layer.set_backend("cpu")
    assert "\n" not in str(info.value)


def test_static_group_act_order_needs_no_gather_and_classic_act_order_one():
    gen = torch.Generator().manual_seed(5)
    static = make_layer(256, 64, 4, 64, False, False, "gptq", gen, backend="cpu")
    classic = make_layer(256, 64, 4, 64, True, False, "gptq", gen, backend="cpu")
    assert static._plan[0][3]["perm"] is None
    assert classic._plan[0][3]["perm"] is not None


def test_without_the_checkpoint_copy_the_layer_holds_half_a_byte_per_weight():
    k, n = 1536, 1024
    layer = QuantLinear.random(k, n, group_size=128, bias=True)
    x = torch.randn(2, k).bfloat16()
    y = layer.set_backend("cpu")(x)
    layer.set_backend("cpu", keep_checkpoint=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert getattr(layer, name).numel() == 0
    assert torch.equal(layer(x), y)
    state = layer._plan[0][3]
    held = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert held <= 1.15 * k * n / 2  # codes + per-group scale/zero (kernel bf16 pair, checkpoint scale, zero)
    with pytest.raises(UserError):
        layer.state_dict()


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_every_cpu_instruction_set_layout_is_read_back(capability):
    """torch packs differently per ISA (AVX512: 64-row blocks; AVX2: 32; none: 32 in pairs): the backend must
    find each, or say it is unavailable; the many-row path (which reads the layout) must stay exact."""
    code = ("import torch; from qwen_quant.kernels import cpu_backend as c; from test_quant_linear import "
            "make_layer, assert_close_to_reference\n"
            "ok, why = c.available(); assert ok, why; print(why)\n"
            "layer = make_layer(576, 136, 4, 128, True, True, 'gptq', torch.Generator().manual_seed(0), backend='cpu')\n"
            "for rows in (1, 100): assert_close_to_reference(layer, torch.randn(rows, 576).bfloat16(), slack=2.0)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    here = os.path.dirname(os.path.abspath(__file__))  # not the repository root: its kernels/ folder would shadow
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert capability.upper() in done.stdout


def test_the_packed_layout_is_read_back_exactly():
    codes = torch.randint(0, 16, (192, 320), dtype=torch.int32, generator=torch.Generator().manual_seed(6))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    back = cpu_backend.unpack_into(packed, torch.empty(320, 192, dtype=torch.int32), cpu_backend.packed_layout())
    assert torch.equal(back.t(), codes)


def test_the_dequantize_buffer_serves_inference_mode_and_plain_no_grad_alike():
    layer = QuantLinear.random(256, 128, group_size=128).set_backend("cpu")
    x = torch.randn(cpu_backend.KERNEL_MAX_ROWS + 36, 256).bfloat16()  # the many-row path: the reused buffer
    cpu_backend._workspace.__dict__.pop("buffers", None)  # made afresh below, as in a new process
    with torch.inference_mode():  # the fast engine's mode, first: the buffer is made here
        inside = layer(x)
    with torch.no_grad():
        outside = layer(x)
    assert torch.equal(inside, outside)
