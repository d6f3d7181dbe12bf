"""Attach weights BY NAME to the fast engine's compact model, from an HF model instance or a state dict.

From a model instance the engine borrows its modules as they are (nn.Linear, QuantLinear with its
chosen backend, nn.Embedding): no copy, no extra memory, no trust_remote_code at run time (a Qwen v1
model already loaded is only read by name). A bf16 nn.Linear on the CPU is called through
model.PackedLinear (a packed copy: a faster one-row product; q/k/v and gate/up in one product each). From a
state dict it wraps each tensor in a module.
The block paths and the names inside a block come from the layout table (models/layouts.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.engine.model import (Attention, Block, FeedForward, ModelArgs, RMSNorm, Transformer,
                                   for_decode, packable)
from qwen_quant.models.layouts import LAYOUTS, Layout, layout_for

_UNSUPPORTED_ROPE = ("dynamic", "longrope")


def model_args(config, layout: str) -> ModelArgs:
    """Shapes and options from an HF config (Qwen v1's own keys for layout "qwen")."""
    n_heads = config.num_attention_heads
    dim = config.hidden_size
    if layout == "qwen":
        head_dim = getattr(config, "kv_channels", None) or dim // n_heads
        seq_length = getattr(config, "seq_length", None)
        return ModelArgs(
            layout, config.num_hidden_layers, dim, n_heads, n_heads, head_dim, config.vocab_size,
            float(getattr(config, "layer_norm_epsilon", 1e-6)),
            rope_dims=int(head_dim * float(getattr(config, "rotary_pct", 1.0))),
            logn_seq_length=seq_length if getattr(config, "use_logn_attn", False) else None,
            ntk_seq_length=seq_length if getattr(config, "use_dynamic_ntk", False) else None,
            rope_base=float(getattr(config, "rotary_emb_base", 10000.0)))
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UserError("this model uses sliding-window attention, which the fast engine does not implement; "
                        "use --engine hf")
    head_dim = getattr(config, "head_dim", None) or dim // n_heads
    return ModelArgs(layout, config.num_hidden_layers, dim, n_heads,
                     getattr(config, "num_key_value_heads", None) or n_heads, head_dim, config.vocab_size,
                     float(config.rms_norm_eps), rope_dims=head_dim, qk_norm=layout == "qwen3")


def rope_from_config(config, args: ModelArgs) -> tuple[torch.Tensor, float]:
    """inv_freq [rope_dims/2] and the cos/sin scale, as transformers computes them for this config."""
    if args.layout == "qwen":
        d = args.rope_dims
        return 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type in _UNSUPPORTED_ROPE:
        raise UserError(f"rope type {rope_type!r} changes with the length; the fast engine does not implement it "
                        f"(use --engine hf)")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return inv_freq.float(), float(scaling)
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    d = args.rope_dims
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0


def _rope_from_model(model: nn.Module, config, args: ModelArgs) -> tuple[torch.Tensor, float]:
    """The source model's own rotary module when it has one (exactly its inv_freq), else the config."""
    for mod in model.modules():
        inv_freq = getattr(mod, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and hasattr(mod, "attention_scaling"):
            if getattr(mod, "rope_type", "default") in _UNSUPPORTED_ROPE:
                break  # let rope_from_config raise its message
            return inv_freq.detach().float().cpu(), float(mod.attention_scaling)
    return rope_from_config(config, args)


def _assemble(args: ModelArgs, layout: Layout, take_linear, norm_weight, embed, lm_head, inv_freq, scaling):
    names = layout.names
    blocks = []
    for i in range(args.n_layers):
        pre = f"{layout.blocks}.{i}."

        def linear(key):
            return take_linear(pre + names[key])

        if "qkv" in names:
            proj = dict(qkv=for_decode(linear("qkv")))
        elif packable(linear("q"), linear("k"), linear("v")):  # one packed product for the three
            proj = dict(qkv=for_decode(linear("q"), linear("k"), linear("v")))
        else:
            proj = dict(q=linear("q"), k=linear("k"), v=linear("v"))
        qk_norms = {}
        if args.qk_norm:
            qk_norms = dict(q_norm=RMSNorm(norm_weight(pre + names["q_norm"]), args.norm_eps),
                            k_norm=RMSNorm(norm_weight(pre + names["k_norm"]), args.norm_eps))
        attn = Attention(args, o=for_decode(linear("o")), **proj, **qk_norms)
        if packable(linear("gate"), linear("up")):
            mlp = FeedForward(None, None, for_decode(linear("down")), gate_up=for_decode(linear("gate"), linear("up")))
        else:
            mlp = FeedForward(linear("gate"), linear("up"), for_decode(linear("down")))
        blocks.append(Block(RMSNorm(norm_weight(pre + names["attn_norm"]), args.norm_eps), attn,
                            RMSNorm(norm_weight(pre + names["mlp_norm"]), args.norm_eps), mlp))
    norm = RMSNorm(norm_weight(layout.final_norm), args.norm_eps)
    return Transformer(args, embed, blocks, norm, for_decode(lm_head), inv_freq, scaling)


def _layout_of(model: nn.Module) -> Layout:
    layout = layout_for(model)
    if not layout.names:
        raise UserError(f"the fast engine knows the layouts {', '.join(lay.name for lay in LAYOUTS)}, not {layout.name!r}; "
                        f"use --engine hf")
    return layout


def from_hf_model(model: nn.Module) -> Transformer:
    """A compact Transformer that borrows the modules of a loaded HF model (dense or QuantLinear)."""
    if getattr(model, "config", None) is None:
        raise UserError("the fast engine needs a transformers model with a .config (or a state dict and its config)")
    layout = _layout_of(model)
    config = model.config
    args = model_args(config, layout.name)

    def linear(name):
        return model.get_submodule(name)

    def norm_weight(name):
        return model.get_submodule(name).weight

    inv_freq, scaling = _rope_from_model(model, config, args)
    lm_head = model.get_submodule(layout.lm_head)
    return _assemble(args, layout, linear, norm_weight, model.get_submodule(layout.embed), lm_head,
                     inv_freq, scaling)


def from_state_dict(state_dict: dict[str, torch.Tensor], config) -> Transformer:
    """A compact Transformer over a state dict (HF names); GPTQ tensors (qweight...) become QuantLinear."""
    model_type = str(getattr(config, "model_type", "")).lower()
    layout = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
    if layout is None or not layout.names:
        raise UserError(f"the fast engine has no layout for model type {model_type!r}")
    args = model_args(config, layout.name)
    quant = getattr(config, "quantization_config", None)

    def linear(name):
        bias = state_dict.get(f"{name}.bias")
        if f"{name}.weight" in state_dict:
            w = state_dict[f"{name}.weight"]
            mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            mod.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                mod.bias = nn.Parameter(bias, requires_grad=False)
            return mod
        if f"{name}.qweight" in state_dict:
            return _quant_linear(name, state_dict, quant, bias)
        raise UserError(f"the state dict has no weight for {name!r}: is it a {layout.name} model?")

    def norm_weight(name):
        if f"{name}.weight" not in state_dict:
            raise UserError(f"the state dict has no weight for {name!r}: is it a {layout.name} model?")
        return state_dict[f"{name}.weight"]

    embed_w = state_dict[f"{layout.embed}.weight"]
    embed = nn.Embedding.from_pretrained(embed_w, freeze=True)
    head_w = state_dict.get(f"{layout.lm_head}.weight", embed_w)  # tied embeddings
    lm_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, device="meta")
    lm_head.weight = nn.Parameter(head_w, requires_grad=False)
    inv_freq, scaling = rope_from_config(config, args)
    return _assemble(args, layout, linear, norm_weight, embed, lm_head, inv_freq, scaling)


def _quant_linear(name, state_dict, quant, bias):
    from qwen_quant.kernels.format import QuantConfig
    from qwen_quant.kernels.quant_linear import QuantLinear

    if quant is None:
        raise UserError(f"{name} holds GPTQ tensors but the config has no quantization_config")
    qc = QuantConfig.from_dict(quant if isinstance(quant, dict) else quant.to_dict())
    qweight, scales = state_dict[f"{name}.qweight"], state_dict[f"{name}.scales"]
    in_features, out_features = qweight.shape[0] * 32 // qc.bits, qweight.shape[1]
    mod = QuantLinear(in_features, out_features, bits=qc.bits, group_size=qc.group_size, bias=bias is not None,
                      dtype=scales.dtype, checkpoint_format=qc.checkpoint_format)
    sd = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
    mod.load_state_dict(sd, strict=False)
    return mod.to(qweight.device)
