"""Model families as data, one row each: where the decoder blocks are, which linears form each
true-sequential step (the quantizer's view) and what each weight inside a block is called (the fast
engine's view). A new family is one row of LAYOUTS.

GPTQ quantizes a block's linears in the order the block computes them ("true sequential"): the
linears of one step see the same input, so they share one Hessian capture; later steps see inputs
that already went through the quantized earlier steps.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch.nn as nn

_LLAMA_STYLE_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_STYLE_NAMES = dict(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                          q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                          gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    steps: tuple[tuple[str, ...], ...]  # true-sequential steps, names relative to a block
    embed: str
    final_norm: str
    lm_head: str = "lm_head"
    fallback: bool = False
    # what the fast engine calls each weight of a block (attn_norm, q/k/v or a fused qkv, o, gate, up, down,
    # q_norm/k_norm); empty for the generic fallback, which the engine cannot run
    names: dict = dataclasses.field(default_factory=dict, hash=False)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for step in self.steps for n in step)


LAYOUTS: tuple[Layout, ...] = (
    # Qwen v1 (QWenLMHeadModel, remote code): fused q,k,v in c_attn; its MLP is w1(x) * silu(w2(x)): w2 is the gate.
    Layout("qwen", ("qwen",), "transformer.h",
           (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
           embed="transformer.wte", final_norm="transformer.ln_f",
           names=dict(attn_norm="ln_1", mlp_norm="ln_2", qkv="attn.c_attn", o="attn.c_proj",
                      gate="mlp.w2", up="mlp.w1", down="mlp.c_proj")),
    Layout("qwen2", ("qwen2",), "model.layers", _LLAMA_STYLE_STEPS,
           embed="model.embed_tokens", final_norm="model.norm", names=_LLAMA_STYLE_NAMES),
    Layout("qwen3", ("qwen3",), "model.layers", _LLAMA_STYLE_STEPS,
           embed="model.embed_tokens", final_norm="model.norm",
           names=dict(_LLAMA_STYLE_NAMES, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")),
    Layout("llama", ("llama", "mistral"), "model.layers", _LLAMA_STYLE_STEPS,
           embed="model.embed_tokens", final_norm="model.norm", names=_LLAMA_STYLE_NAMES),
)


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "").lower()


def _find_repeated_blocks(model: nn.Module) -> str | None:
    """The largest nn.ModuleList whose children all share one class (the decoder stack)."""
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1:
                best, best_len = name, len(mod)
    return best


def layout_for(model: nn.Module) -> Layout:
    """The layout of `model`: from the table by model_type, else the generic fallback (with a warning)."""
    mt = _model_type(model)
    for layout in LAYOUTS:
        if mt in layout.model_types:
            try:
                blocks = model.get_submodule(layout.blocks)
                first = blocks[0]
                for n in layout.linear_names:
                    first.get_submodule(n)
                return layout
            except (AttributeError, IndexError):
                break  # the names do not match this model: fall back
    blocks_path = _find_repeated_blocks(model)
    if blocks_path is None:
        from qwen_quant.errors import UserError
        raise UserError(f"cannot find repeated decoder blocks in model type {mt!r}; add a layout to models/layouts.py")
    first = model.get_submodule(blocks_path)[0]
    names = tuple(n for n, m in first.named_modules() if isinstance(m, nn.Linear))
    warnings.warn(
        f"unknown architecture {mt!r}: quantizing every nn.Linear inside {blocks_path}.* one at a time "
        f"({len(names)} per block); add a layout to models/layouts.py for true-sequential steps",
        stacklevel=2,
    )
    return Layout(f"generic:{mt or 'unknown'}", (mt,), blocks_path, tuple((n,) for n in names),
                  embed="", final_norm="", fallback=True)


def blocks_of(model: nn.Module, layout: Layout) -> nn.ModuleList:
    return model.get_submodule(layout.blocks)
