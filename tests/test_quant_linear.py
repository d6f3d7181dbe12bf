"""QuantLinear on the torch backend (and the shared harness) against a float64 reference.

Reference: kernels/format.py dequantize in float64, then x(float64) @ W^T + bias.
Tolerances: the torch backend on the CPU computes in float32 and rounds the output once to the
activation dtype, so the error is one output rounding (half an ulp: 2^-11 relative for fp16, 2^-8
for bf16) plus float32 accumulation noise; we allow 2 output ulps of the largest |y| in the batch:
    tol = 2 * eps(dtype) * max|y_ref|   (eps fp16 = 2^-10, bf16 = 2^-7, fp32 = 2^-23 * 64 for accumulation)
"""

from __future__ import annotations

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.kernels import format as fmt
from qwen_quant.kernels.quant_linear import QuantLinear

EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-17}


def random_quant(k, n, bits, group_size, act_order, gen, zero_floor=1):
    """Random codes, scales, true zeros and g_idx (act-order: a random permutation of the groups' rows)."""
    groups = fmt.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(zero_floor, 2**bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return codes, scales, zeros, g_idx


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = fmt.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                       layer.in_features, v1=layer.checkpoint_format == "gptq", dtype=torch.float64)
    y = x.to(torch.float64).reshape(-1, layer.in_features) @ w.T
    if layer.bias is not None:
        y = y + layer.bias.to(torch.float64)
    return y.reshape(*x.shape[:-1], layer.out_features)


def assert_close_to_reference(layer, x, slack=1.0):
    y = layer(x)
    ref = reference(layer, x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = slack * 2 * EPS[x.dtype] * ref.abs().max().item()
    err = (y.to(torch.float64) - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def make_layer(k, n, bits, group_size, act_order, bias, fmt_name, gen, backend="torch"):
    codes, scales, zeros, g_idx = random_quant(k, n, bits, group_size, act_order, gen,
                                               zero_floor=0 if fmt_name == "gptq_v2" else 1)
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_quant(codes, scales, zeros, g_idx, b, bits, group_size,
                                  checkpoint_format=fmt_name).set_backend(backend)


CASES = [  # (K, N, bits, group_size, act_order, bias, format)
    (576, 136, 4, 128, False, True, "gptq"),      # partial last group (demo model's 576 / 128)
    (256, 72, 4, 32, True, False, "gptq"),
    (320, 40, 4, 64, True, True, "gptq_v2"),
    (200, 48, 4, -1, False, False, "gptq"),
    (256, 64, 2, 64, True, True, "gptq"),
    (288, 64, 3, 32, False, True, "gptq"),
    (384, 96, 3, 128, True, False, "gptq_v2"),
    (192, 52, 8, 64, True, True, "gptq"),
    (96, 40, 8, -1, False, False, "gptq_v2"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}-N{}-b{}-g{}-act{}-bias{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_backend_matches_float64_reference(case, dtype):
    gen = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    layer = make_layer(*case, gen)
    for rows in (1, 3, 16, 33):
        x = torch.randn(rows, case[0], generator=gen).to(dtype)
        assert_close_to_reference(layer, x)
    assert_close_to_reference(layer, torch.randn(2, 5, case[0], generator=gen).to(dtype))  # [..., K] input


def test_state_dict_is_the_checkpoint_layout():
    gen = torch.Generator().manual_seed(1)
    layer = make_layer(576, 136, 4, 128, True, True, "gptq", gen)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert sd["qweight"].shape == (576 * 4 // 32, 136) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (5, 136 * 4 // 32) and sd["scales"].shape == (5, 136)
    assert sd["scales"].dtype == torch.float16 and sd["g_idx"].dtype == torch.int32
    twin = QuantLinear(576, 136, 4, 128, bias=True)
    twin.load_state_dict(sd)
    twin.set_backend(layer.backend)
    x = torch.randn(3, 576, generator=gen)
    assert torch.equal(twin(x), layer(x))


def test_v1_and_v2_zero_formats_give_the_same_layer():
    gen = torch.Generator().manual_seed(2)
    codes, scales, zeros, g_idx = random_quant(256, 64, 4, 64, False, gen)
    v1 = QuantLinear.from_quant(codes, scales, zeros, g_idx, None, 4, 64, checkpoint_format="gptq")
    v2 = QuantLinear.from_quant(codes, scales, zeros, g_idx, None, 4, 64, checkpoint_format="gptq_v2")
    assert not torch.equal(v1.qzeros, v2.qzeros)  # v1 stores zero-1
    x = torch.randn(4, 256, generator=gen)
    assert torch.equal(v1(x), v2(x))
    with pytest.raises(UserError):
        QuantLinear.from_quant(codes, scales, torch.zeros_like(zeros), g_idx, None, 4, 64, checkpoint_format="gptq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_layer_has_valid_layout_and_sane_outputs(bits):
    layer = QuantLinear.random(256, 96, bits=bits, group_size=64, bias=True)
    zeros = fmt.unpack_qzeros(layer.qzeros, bits, 96)
    assert torch.all(zeros == 2 ** (bits - 1))
    w = fmt.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 256)
    assert 0.005 < w.std().item() < 0.05
    x = torch.randn(2, 256)
    assert_close_to_reference(layer, x.half())
    meta = QuantLinear.random(4096, 11008, device="meta")
    assert meta.qweight.device.type == "meta" and meta.qweight.shape == (512, 11008)


def test_bad_arguments_and_unavailable_backends_are_one_line_errors():
    with pytest.raises(UserError):
        QuantLinear(64, 64, bits=5)
    with pytest.raises(UserError):
        QuantLinear(64, 64, group_size=0)
    layer = QuantLinear.random(64, 64, group_size=32)
    for bad in ("cuda", "fastest"):
        with pytest.raises(UserError) as info:
            layer.set_backend(bad)
        assert "\n" not in str(info.value)


def test_auto_on_cpu_picks_a_cpu_backend_and_moves_reprepare():
    layer = QuantLinear.random(128, 64, group_size=32).set_backend("auto")
    assert layer.backend in ("cpu", "torch")  # cpu where torch has its int4 kernel (tests/test_cpu_backend.py)
    x = torch.randn(2, 128)
    y = layer(x)
    layer.to(torch.device("cpu"))
    assert torch.equal(layer(x), y)


def test_keep_checkpoint_false_frees_buffers_and_refuses_saving():
    layer = QuantLinear.random(128, 64, group_size=32)
    x = torch.randn(2, 128)
    y = layer.set_backend("torch")(x)
    layer.set_backend("torch", keep_checkpoint=False)  # torch reads the buffers in place: nothing freed
    assert layer.qweight.numel() == 16 * 64
    assert torch.equal(layer(x), y)
    with pytest.raises(UserError):
        layer.state_dict()


def test_replace_with_random_quant_builds_layers_from_a_meta_model():
    from transformers import AutoModelForCausalLM

    from qwen_quant.models.layouts import blocks_of, layout_for
    from qwen_quant.models.synthetic import replace_with_random_quant
    from qwen_quant.models.synthetic import synthetic_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(synthetic_config("tiny"))
    replace_with_random_quant(model, bits=4, group_size=32, device="cpu")
    layout = layout_for(model)
    for block in blocks_of(model, layout):
        for name in layout.linear_names:
            layer = block.get_submodule(name)
            assert isinstance(layer, QuantLinear) and layer.qweight.device.type == "cpu"
            assert layer.backend in ("cpu", "torch")  # auto on the CPU
    q = blocks_of(model, layout)[0].get_submodule("self_attn.q_proj")
    assert q.bias is not None  # Qwen2 layout: q/k/v keep their bias
    assert_close_to_reference(q, torch.randn(3, q.in_features).half())


def test_a_prepared_layer_deep_copies_with_or_without_its_checkpoint():
    import copy

    layer = QuantLinear.random(128, 64, group_size=32).set_backend("auto")
    x = torch.randn(2, 128)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x)) and twin.backend == layer.backend
    layer.set_backend("auto", keep_checkpoint=False)  # inference only: the plan is all there is to copy
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x)) and twin._plan[0][3] is not layer._plan[0][3]
