"""Synthetic models: random weights at real Qwen shapes (SEED.md), for speed and memory only.

A synthetic model never gets an accuracy number; its checkpoints and reports say "synthetic". Weights
follow the usual init scale (std 0.02, norms 1) so activations stay finite. Models are built on the meta
device and materialized on the target device; a synthetic Int4 model's linears become random Int4
layers in the packed GPTQ layout first, so a 7B model never holds 16-bit copies of them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.kernels.quant_linear import QuantLinear
from qwen_quant.models.layouts import blocks_of, layout_for

# Real Qwen shapes (SEED.md). Qwen v1 shapes are built as Qwen2ForCausalLM with v1's dimensions
# (MHA, q/k/v bias, SwiGLU of 11008/13696 per branch): the same bytes and FLOPs per token as
# QWenLMHeadModel, without remote code. Speed and memory only: the weights are random.
SYNTHETIC_SHAPES: dict[str, dict] = {
    "qwen-7b": dict(model_type="qwen2", layout="v1", num_hidden_layers=32, hidden_size=4096,
                    num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                    vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen-14b": dict(model_type="qwen2", layout="v1", num_hidden_layers=40, hidden_size=5120,
                     num_attention_heads=40, num_key_value_heads=40, intermediate_size=13696,
                     vocab_size=152064, max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", layout="qwen2", num_hidden_layers=28, hidden_size=3584,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                       vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", layout="qwen3", num_hidden_layers=36, hidden_size=4096,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False),
    # For tests: Qwen2 layout, odd FFN width (320 = 2.5 groups of 128: a partial last group).
    "tiny": dict(model_type="qwen2", layout="qwen2", num_hidden_layers=2, hidden_size=128,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=320,
                 vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False),
}



def synthetic_config(shape: str):
    from transformers import AutoConfig

    d = dict(SYNTHETIC_SHAPES[shape])
    d.pop("layout")
    model_type = d.pop("model_type")
    bias = model_type == "qwen2"
    cfg = AutoConfig.for_model(model_type, **d)
    if model_type == "qwen2":
        cfg.attention_bias = bias
    cfg.rms_norm_eps = 1e-6
    cfg.dtype = "bfloat16"
    cfg.synthetic = True
    cfg.synthetic_shape = shape
    return cfg


def build_synthetic(shape: str, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """Random weights at a real Qwen shape: built on the meta device, materialized on `device`.

    Weight values follow the usual init scale (std 0.02, norms 1) so activations stay finite; the
    values themselves do not matter for speed and memory.
    """
    from transformers import AutoModelForCausalLM

    cfg = synthetic_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                # random values drawn on the target device (fast on a GPU), in row chunks so a
                # 14B model needs no full-size fp32 temporary
                rows = max(1, (1 << 24) // p.shape[1])
                for i in range(0, p.shape[0], rows):
                    chunk = torch.randn(p[i:i + rows].shape, generator=gen, device=device) * 0.02
                    p[i:i + rows].copy_(chunk.to(dtype=p.dtype))
    reset_rotary(model)
    model.eval()
    return model


def reset_rotary(model) -> None:
    """Rotary frequencies come from the config, not from storage that was allocated empty: take them
    from a freshly built rotary module (a meta/to_empty build leaves them uninitialized)."""
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, "config"):
            with torch.device("cpu"):
                fresh = type(mod)(mod.config)
            device = next(iter(mod.buffers()), torch.empty(0)).device
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(mod, name, buf.to(device))
            mod.attention_scaling = getattr(fresh, "attention_scaling", 1.0)




def _model_device(model: nn.Module) -> torch.device:
    """Where the model's real (non-meta) tensors live; cpu when everything is still meta."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def replace_with_random_quant(model: nn.Module, bits: int = 4, group_size: int = 128, backend: str = "auto",
                              device=None, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Swap every layout linear for QuantLinear.random (same shapes and bias); returns the model."""
    device = torch.device(device) if device is not None else _model_device(model)
    layout = layout_for(model)
    for block in blocks_of(model, layout):
        for name in layout.linear_names:
            old = block.get_submodule(name)
            if isinstance(old, QuantLinear):
                continue
            if not isinstance(old, nn.Linear):
                raise UserError(f"{name} is a {type(old).__name__}, not nn.Linear; cannot make it a random Int4 layer")
            new = QuantLinear.random(old.in_features, old.out_features, bits=bits, group_size=group_size,
                                     bias=old.bias is not None, dtype=dtype, device=device)
            new.set_backend(backend)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new)
    return model


def build_synthetic_int4(shape: str, device: str, dtype: torch.dtype, backend: str = "auto", seed: int = 0,
                         group_size: int = 128):
    """A synthetic model whose layout linears are random Int4 layers (QuantLinear.random), built on meta."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(synthetic_config(shape), dtype=dtype)
    replace_with_random_quant(model, bits=4, group_size=group_size, backend=backend, device=device, dtype=dtype)
    _materialize_rest(model, device, seed)
    return model


@torch.no_grad()
def _materialize_rest(model, device: str, seed: int) -> None:
    """Embeddings, norms and head (still on meta) get real storage: norms 1, biases 0, matrices N(0, 0.02)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod_name, mod in model.named_modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in list(table.items()):
                if t is None or t.device.type != "meta":
                    continue
                real = torch.empty(t.shape, dtype=t.dtype, device=device)
                if real.ndim <= 1:
                    real.fill_(1.0 if "norm" in f"{mod_name}.{name}" and name == "weight" else 0.0)
                else:
                    rows = max(1, (1 << 24) // real.shape[1])  # chunks: no full-size fp32 temporary
                    for i in range(0, real.shape[0], rows):
                        real[i:i + rows].copy_(torch.randn(real[i:i + rows].shape, generator=gen, device=device) * 0.02)
                table[name] = torch.nn.Parameter(real, requires_grad=False) if kind == "param" else real
    reset_rotary(model)


class SyntheticTensors:
    """A synthetic model's tensors by name, made when read (the interface of quantize.writer.SafetensorsFolder):
    the same values for the same name and seed on every read, drawn like build_synthetic's (matrices N(0, 0.02),
    norms 1, biases 0). Lets the quantizer stream a synthetic model block by block, as it streams a safetensors
    folder: host RAM holds one block, never the model."""

    def __init__(self, shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.shape, self.dtype, self.seed = shape, dtype, seed
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(synthetic_config(shape), dtype=dtype)
        self._shapes = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape_dtype(self, name: str) -> tuple[tuple, torch.dtype]:
        if name not in self._shapes:
            raise UserError(f"tensor {name} is not part of synthetic:{self.shape}")
        return self._shapes[name]

    def float_dtype(self) -> torch.dtype:
        return self.dtype

    def read(self, name: str) -> torch.Tensor:
        shape, dtype = self.shape_dtype(name)
        if len(shape) <= 1:
            return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype)
        import zlib

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
