"""Activation-aware channel scales (quantize/equalize.py): the fold keeps the function, the search keeps its promise
(never worse than no scaling on what it scores), and a run records and writes what it did."""

import json

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.kernels.format import dequantize
from qwen_quant.models.layouts import Layout, layout_for
from qwen_quant.quantize import equalize, gptq, pipeline
from test_pipeline import calibration, one_thread, run, tensors_of, tiny_hf_model  # noqa: F401 (autouse fixture)


def block_inputs(model, n=4, seqlen=16):
    layout = layout_for(model)
    source = pipeline.InMemoryModel(model, layout)
    return source, pipeline.capture_block_inputs(source, calibration(n=n, seqlen=seqlen), "cpu")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_folding_any_scales_leaves_the_blocks_outputs_unchanged(model_type):
    model = tiny_hf_model(model_type)
    source, inputs = block_inputs(model)
    block = source.blocks[0]
    before = [inputs.run(block, i) for i in range(len(inputs.hidden))]
    g = torch.Generator().manual_seed(1)
    for group in equalize.scale_groups(source.layout, block):
        k = block.get_submodule(group.linears[0]).in_features
        equalize.fold(block, group, torch.rand(k, generator=g) * 4 + 0.25)
    after = [inputs.run(block, i) for i in range(len(inputs.hidden))]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_groups_follow_the_block_and_skip_v_to_o_under_grouped_query_attention():
    model = tiny_hf_model("qwen2")  # 4 heads, 2 key-value heads: v_proj gives 32 outputs, o_proj takes 64
    layout = layout_for(model)
    groups = equalize.scale_groups(layout, model.model.layers[0])
    assert [(g.source, g.linears) for g in groups] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",))]
    generic = Layout("generic:x", ("x",), "model.layers", (("mlp.down_proj",),), embed="", final_norm="",
                     fallback=True)
    with pytest.raises(UserError, match="--awq-scales"):
        equalize.scale_groups(generic, model.model.layers[0])


def test_search_never_scores_worse_than_no_scaling_and_finds_outlier_channels():
    """Inputs with a few loud channels: the error of the scales found is at most the unscaled error (alpha 0 is on
    the grid) and clearly below it; scaling the loud channels up is what buys it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    loud = torch.tensor([3, 70, 200])
    x[:, loud] *= 30
    w = torch.randn(96, 256, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    mean_abs = x.abs().mean(0)
    s, alpha, ratio = equalize.search_scales([w[:64], w[64:]], h, mean_abs, bits=4, group_size=64, sym=True)
    assert alpha is not None and 0 <= alpha < 1 and ratio < 0.9
    plain = equalize.output_error(w, h, torch.ones(256), 4, 64, True).sum()
    scaled = equalize.output_error(w, h, s, 4, 64, True).sum()
    assert scaled < plain  # on every row, not only the strided ones scored
    assert s[loud].min() > s.max() * 0.3
    # the geometric mean of the scales is 1: the weights keep their size
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))


def test_mean_abs_counts_real_tokens_only():
    acc = gptq.HessianAccumulator(3)
    x = torch.tensor([[[1.0, -2.0, 3.0], [-1.0, 2.0, 5.0], [100.0, 100.0, 100.0]]])
    acc.add_batch(x, mask=torch.tensor([[True, True, False]]))
    torch.testing.assert_close(acc.mean_abs(), torch.tensor([1.0, 2.0, 4.0]))


def test_drop_above_leaves_massive_tokens_out_of_the_statistics_but_not_out_of_the_peak():
    g = torch.Generator().manual_seed(0)
    ordinary = torch.randn(15, 8, generator=g)
    sink = torch.full((1, 8), 40.0)  # norm ~113 against ordinary ones of ~2.8
    x = torch.cat([sink, ordinary]).unsqueeze(0)
    kept, every = gptq.HessianAccumulator(8), gptq.HessianAccumulator(8)
    kept.add_batch(x, drop_above=3.0)
    every.add_batch(x)
    assert (kept.dropped, kept.tokens, every.dropped, every.tokens) == (1, 15, 0, 16)
    torch.testing.assert_close(kept.mean_abs(), ordinary.abs().mean(0))
    torch.testing.assert_close(kept.hessian(), 2 * ordinary.T @ ordinary / 15)
    assert kept.input_peak() == every.input_peak() > 30  # --rtn-massive still sees the sink


def test_awq_run_without_the_massive_tokens_records_what_it_left_out(tmp_path):
    """--awq-drop-massive: a ratio no token reaches searches exactly as --awq-scales alone; ratio 1 (every token
    above its sample's median norm) leaves out about half of every group's tokens, and the records say so."""
    calib = calibration(n=8, seqlen=32)

    def report(out, **kw):
        return json.loads((run(tiny_hf_model("qwen2"), tmp_path / out, awq_scales=True, calib=calib, **kw)
                           / "quant_report.json").read_text())

    plain, unreached = report("plain"), report("unreached", awq_drop_massive=1e5)
    half = report("half", awq_drop_massive=1.0)
    assert [layer["awq_alpha"] for layer in unreached["layers"]] == [layer["awq_alpha"] for layer in plain["layers"]]
    assert all(layer["awq_dropped_tokens"] is None for layer in plain["layers"])
    assert "awq_drop_massive" not in plain["settings"] and half["settings"]["awq_drop_massive"] == 1.0
    searched = [layer for layer in half["layers"] if layer["awq_error_ratio"] is not None]
    assert searched and all(0.3 * 8 * 32 < layer["awq_dropped_tokens"] < 0.6 * 8 * 32 for layer in searched)
    assert "left out tokens over 1 x" in (tmp_path / "half" / "README.md").read_text()


def test_awq_run_writes_the_folded_norms_and_the_weights_it_fed_forward(tmp_path):
    """A --awq-scales run: the checkpoint's norms are the folded ones (not the model's), every linear still equals
    the weights fed forward, each layer records its alpha, and the model card says what was done."""
    model = tiny_hf_model("qwen2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model, tmp_path / "awq", awq_scales=True, calib=calibration(n=8, seqlen=32))
    t = tensors_of(out)
    report = json.loads((out / "quant_report.json").read_text())
    assert report["settings"]["awq_scales"] is True
    scaled = [layer for layer in report["layers"] if layer["awq_error_ratio"] is not None]
    assert {layer["name"].split(".")[-1] for layer in scaled} == {"q_proj", "k_proj", "v_proj", "gate_proj",
                                                                  "up_proj", "down_proj"}
    assert all(layer["awq_error_ratio"] <= 1.0 for layer in scaled)
    assert any(layer["awq_alpha"] is not None and layer["awq_error_ratio"] < 1 for layer in scaled)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(t[norm], model.get_submodule("model.layers.0.input_layernorm").weight.half())
    assert not torch.allclose(t[norm].float(), original[norm], atol=1e-3)
    p = "model.layers.1.mlp.down_proj"
    w = dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4,
                   model.get_submodule(p).in_features)
    torch.testing.assert_close(w, model.get_submodule(p).weight.detach(), rtol=0, atol=1e-6)
    assert "activation-aware channel scales" in (out / "README.md").read_text()
    plain = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "p") / "quant_report.json").read_text())
    assert "awq_scales" not in plain["settings"] and all(layer["awq_error_ratio"] is None for layer in plain["layers"])


def test_weight_size_is_each_channels_weight_against_its_groups_largest():
    w = torch.tensor([[1.0, -4.0, 2.0, 8.0], [-2.0, 2.0, 1.0, -1.0]])
    # groups of 2 along the input: row 0 -> [1/4, 1, 2/8, 1], row 1 -> [1, 1, 1, 1]; averaged over the rows
    torch.testing.assert_close(equalize.weight_size([w[:1], w[1:]], 2), torch.tensor([0.625, 1.0, 0.625, 1.0]))
    torch.testing.assert_close(equalize.weight_size([w], -1), torch.tensor([0.5625, 0.75, 0.375, 0.75]))
