"""load_quantized on checkpoints written here in the exact FORMAT.md layout (single file and sharded,
v1 and gptq_v2 zeros, desc_act, tied embeddings, biases), plus one-line errors for bad checkpoints.

Reference: the same tiny model with every quantized linear's weight replaced by the float64
dequantization (format.dequantize) of the tensors we wrote. Both run in float32 on the CPU, so
logits agree to float32 accumulation noise: we allow 1e-4 * max|logit|.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from qwen_quant.errors import UserError
from qwen_quant.kernels import format as fmt
from qwen_quant.kernels import cpu_backend
from qwen_quant.kernels.loader import load_quantized
from qwen_quant.kernels.quant_linear import QuantLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_model(kind: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if kind == "llama":  # tied embeddings, like the demo model
        config = LlamaConfig(tie_word_embeddings=True, **common)
    else:  # qwen2: q/k/v biases, separate lm_head
        config = Qwen2Config(tie_word_embeddings=False, **common)
    return AutoModelForCausalLM.from_config(config).eval()


def rtn_codes(w: torch.Tensor, bits: int, group_size: int, g_idx: torch.Tensor, v1: bool):
    """Plain asymmetric round-to-nearest per group of input rows -> codes [K,N], scales, zeros."""
    wt = w.T.to(torch.float64)  # [K, N]
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, wt.shape[1], dtype=torch.float64)
    zeros = torch.empty(groups, wt.shape[1], dtype=torch.int64)
    top = 2**bits - 1
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        scales[g] = ((hi - lo) / top).clamp(min=1e-6)
        zeros[g] = torch.round(-lo / scales[g]).clamp(1 if v1 else 0, top)  # v1 cannot store zero 0
    scales = scales.half()
    codes = torch.round(wt / scales[g_idx].double() + zeros[g_idx]).clamp(0, top).long()
    return codes, scales, zeros


def write_checkpoint(folder, kind, bits=4, group_size=32, fmt_name="gptq", desc_act=False, shards=1):
    """Quantize a tiny model's linears and write them exactly as FORMAT.md says; return the reference model."""
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    v1 = fmt_name == "gptq"
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if kind == "llama" and name == "lm_head.weight":
            continue  # tied: not stored
        tensors[name] = tensor.half().contiguous()
    for i in range(2):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            module = model.get_submodule(prefix)
            k = module.in_features
            g_idx = fmt.default_g_idx(k, group_size)
            if desc_act:
                g_idx = g_idx[torch.randperm(k, generator=gen)]
            codes, scales, zeros = rtn_codes(module.weight.detach(), bits, group_size, g_idx, v1)
            del tensors[f"{prefix}.weight"]
            tensors[f"{prefix}.qweight"] = fmt.pack_qweight(codes, bits)
            tensors[f"{prefix}.qzeros"] = fmt.pack_qzeros(zeros, bits, v1=v1)
            tensors[f"{prefix}.scales"] = scales
            tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
            w = fmt.dequantize(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], scales, g_idx, bits, k, v1=v1)
            ref_module = reference.get_submodule(prefix)
            ref_module.weight.data = w
            if module.bias is not None:
                tensors[f"{prefix}.bias"] = module.bias.detach().half()
                ref_module.bias.data = tensors[f"{prefix}.bias"].float()
    for name, tensor in reference.named_parameters():  # the reference sees the fp16-rounded tensors too
        if not any(name.startswith(f"model.layers.{i}.{lin}") for i in range(2) for lin in LINEARS):
            tensor.data = tensor.data.half().float()
    config = model.config.to_dict()
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False,
            "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": fmt_name,
            "lm_head": False, "meta": {"quantizer": "test_loader"}}
    config["quantization_config"] = qcfg
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(qcfg))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return reference


@pytest.mark.parametrize("kind,bits,group_size,fmt_name,desc_act,shards", [
    ("llama", 4, 32, "gptq", False, 1),       # tied embeddings, partial last group (80 = 2*32 + 16)
    ("qwen2", 4, 64, "gptq_v2", True, 3),     # biases, act-order, v2 zeros, sharded
    ("qwen2", 8, -1, "gptq", True, 2),
    ("llama", 4, 16, "gptq_v2", False, 1),
])
def test_loaded_model_matches_dequantized_reference(tmp_path, kind, bits, group_size, fmt_name, desc_act, shards):
    reference = write_checkpoint(tmp_path, kind, bits, group_size, fmt_name, desc_act, shards)
    model = load_quantized(tmp_path, backend="auto", device="cpu", dtype=torch.float32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kernel = bits == 4 and group_size % 32 == 0 and cpu_backend.available()[0]  # else the reference path
    assert len(quant) == 14 and all(m.backend == ("cpu" if kernel else "torch") for m in quant)
    assert quant[0].checkpoint_format == fmt_name
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    if kind == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    ref_out = reference.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref_out)



def test_default_cpu_load_is_bf16_inference_without_the_checkpoint_copy(tmp_path):
    reference = write_checkpoint(tmp_path, "qwen2", 4, 64, "gptq_v2", True, 1)
    model = load_quantized(tmp_path, device="cpu", keep_checkpoint=False)
    assert model.dtype == torch.bfloat16
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.qweight.numel() == 0 for m in quant)  # freed as each layer was repacked
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()  # bf16 through 2 blocks
    with pytest.raises(UserError):
        model.state_dict()

def test_state_dict_round_trips_the_checkpoint_tensors(tmp_path):
    write_checkpoint(tmp_path, "qwen2", 4, 32, "gptq", True, 1)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    sd = load_quantized(tmp_path).state_dict()
    for key in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        name = f"model.layers.1.self_attn.q_proj.{key}"
        assert torch.equal(sd[name], stored[name])


def _one_line_error(path, match, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        load_quantized(path, **kwargs)
    assert "\n" not in str(info.value)


def test_non_gptq_and_inconsistent_checkpoints_are_one_line_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    model = tiny_model("llama")
    (plain / "config.json").write_text(json.dumps(model.config.to_dict()))
    _one_line_error(plain, "not a GPTQ checkpoint")

    awq = tmp_path / "awq"
    write_checkpoint(awq, "llama")
    cfg = json.loads((awq / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (awq / "config.json").write_text(json.dumps(cfg))
    _one_line_error(awq, "not a GPTQ checkpoint")

    from safetensors.torch import load_file

    bad = tmp_path / "bad_gidx"
    write_checkpoint(bad, "llama", group_size=32)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.g_idx"][5] = 99  # a group that does not exist
    save_file(tensors, str(bad / "model.safetensors"))
    _one_line_error(bad, "g_idx")

    shape = tmp_path / "bad_shape"
    write_checkpoint(shape, "llama", group_size=32)
    tensors = load_file(str(shape / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.scales"] = tensors["model.layers.1.self_attn.o_proj.scales"][:, :40].contiguous()
    save_file(tensors, str(shape / "model.safetensors"))
    _one_line_error(shape, "inconsistent")

    pickle_only = tmp_path / "pickle"
    write_checkpoint(pickle_only, "llama")
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    _one_line_error(pickle_only, "pickle")

    _one_line_error(tmp_path / "nowhere" / "x", "no checkpoint folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error paths")
def test_cuda_requests_without_a_gpu_are_one_line_errors(tmp_path):
    write_checkpoint(tmp_path, "llama")
    _one_line_error(tmp_path, "backend 'cuda'", backend="cuda")
    _one_line_error(tmp_path, "no CUDA GPU", device="cuda")


def test_the_output_head_sees_its_input_with_canonical_strides(tmp_path):
    """qwen_quant.workarounds: torch's slow BF16 path for a [1, 1, K] slice of the last hidden states (a full copy
    of the weight per prompt) is never taken; the values are the same."""
    write_checkpoint(tmp_path, "qwen2", 4, 64, "gptq_v2", True, 1)
    model = load_quantized(tmp_path, device="cpu")
    seen = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
    hidden = torch.randn(1, 9, model.lm_head.in_features).bfloat16()
    last = hidden[:, -1:, :]  # what generate passes when it keeps one position's logits: strides (9K, K, 1)
    with torch.no_grad():
        out = model.lm_head(last)
    k = model.lm_head.in_features
    assert seen == [(k, k, 1)]
    assert torch.equal(out, torch.nn.functional.linear(last.reshape(1, k), model.lm_head.weight).view(1, 1, -1))


def test_a_checkpoint_without_g_idx_loads_with_the_default_groups(tmp_path):
    """Old checkpoints without act-order omit g_idx: each layer is completed with the default and repacked."""
    from safetensors.torch import load_file

    reference = write_checkpoint(tmp_path, "llama", 4, 32, "gptq", False, 1)
    tensors = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if not k.endswith(".g_idx")}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_quantized(tmp_path, device="cpu", dtype=torch.float32, keep_checkpoint=False)
    assert all(m._plan for m in model.modules() if isinstance(m, QuantLinear))  # every layer repacked at load
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
