"""Turn a MODEL argument and a precision into a ready model for profiling.

Checked in the parent (`resolve_model`, `check_precision`: cheap, no weights) so bad input fails
before any cell starts; built in each cell's subprocess (`build_model`).
A synthetic Int4 model is built on the meta device and its linears become random Int4 layers in
the real GPTQ layout before anything is materialized, so it never holds 16-bit copies of them.
"""

from __future__ import annotations

import dataclasses

import torch

from qwen_quant.errors import UserError
from qwen_quant.quantize.sources import reset_rotary

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT4_GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    model: str  # as the user typed it
    label: str  # short name for tables and folders
    kind: str  # hub | dir | gguf | demo | synthetic
    quantized: bool  # a GPTQ checkpoint: its only precision is int4

    @property
    def precisions(self) -> tuple[str, ...]:
        if self.quantized:
            return ("int4",)
        if self.kind == "synthetic":
            return ("bf16", "fp16", "fp32", "int4")
        return ("bf16", "fp16", "fp32")


def resolve_model(text: str, trust_remote_code: bool = False) -> ModelInfo:
    """Parse MODEL and find out whether it is a quantized checkpoint (reads config.json only)."""
    from qwen_quant.quantize.sources import _read_config_json, parse_model_spec

    spec = parse_model_spec(text)
    quantized = False
    if spec.kind in ("dir", "hub"):
        config = _read_config_json(spec)
        if spec.kind == "dir" and config is None:
            raise UserError(f"{spec.path} has no config.json: not a Hugging Face model folder")
        quantized = bool(config and "quantization_config" in config)
    label = spec.label
    return ModelInfo(text, label, spec.kind, quantized)


def default_precisions(info: ModelInfo) -> list[str]:
    """What to measure when --precision is not given: the seed's pair where it exists."""
    if info.quantized:
        return ["int4"]
    if info.kind == "synthetic":
        return ["bf16", "int4"]
    return ["bf16"]


def check_precision(info: ModelInfo, precision: str) -> None:
    if precision in info.precisions:
        return
    if precision == "int4":
        raise UserError(f"{info.model} has no Int4 form: quantize it first (qwen-quantize {info.model} --out DIR) "
                        f"and profile DIR, or use synthetic:<shape>")
    raise UserError(f"{info.model} is an Int4 checkpoint: its only precision is int4 (drop --precision {precision})")


def build_model(info: ModelInfo, precision: str, device: str, backend: str = "auto", seed: int = 0):
    """The model in `precision` on `device`, in eval mode."""
    check_precision(info, precision)
    if info.quantized:
        from qwen_quant.kernels.loader import load_quantized

        model = load_quantized(info.model, backend=backend, device=device, dtype=int4_compute_dtype(device))
    elif info.kind == "synthetic" and precision == "int4":
        model = build_synthetic_int4(info.model.split(":", 1)[1], device, backend, seed=seed)
    else:
        from qwen_quant.quantize.sources import load_model

        model = load_model(info.model, dtype=DTYPES[precision], device=device, seed=seed).model
        if info.kind == "synthetic":
            reset_rotary(model)
    if precision == "int4":
        _free_unused_quant_buffers(model, backend)
    _use_fast_attention(model)
    return model.eval()


def _use_fast_attention(model) -> None:
    """SDPA, or flash-attention 2 where its package is installed and the model is on a GPU in 16-bit."""
    want = "sdpa"
    try:
        import importlib.util

        on_gpu = next(model.parameters()).device.type == "cuda"
        half = model.dtype in (torch.float16, torch.bfloat16)
        if on_gpu and half and importlib.util.find_spec("flash_attn") is not None:
            want = "flash_attention_2"
    except StopIteration:
        pass
    if getattr(model.config, "_attn_implementation", None) == want:
        return
    try:
        model.set_attn_implementation(want)
    except Exception:  # a model (or remote code) without that implementation keeps its own
        pass


def int4_compute_dtype(device: str) -> torch.dtype:
    """Int4 layers compute in fp16 on a GPU (GPTQ stores fp16 scales; the seed's AutoGPTQ ran fp16),
    in bf16 on the CPU (where torch's fp16 kernels are slow)."""
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def build_synthetic_int4(shape: str, device: str, backend: str = "auto", seed: int = 0):
    """A synthetic model whose layout linears are random Int4 layers (QuantLinear.random), built on meta."""
    from transformers import AutoModelForCausalLM

    from qwen_quant.quantize.random_int4 import replace_with_random_quant
    from qwen_quant.quantize.sources import synthetic_config

    dtype = int4_compute_dtype(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(synthetic_config(shape), dtype=dtype)
    replace_with_random_quant(model, bits=4, group_size=INT4_GROUP_SIZE, backend=backend, device=device, dtype=dtype)
    _materialize_rest(model, device, seed)
    return model


def _free_unused_quant_buffers(model, backend: str) -> None:
    """Each Int4 layer keeps only what its kernel reads (a repacking backend drops the checkpoint copy),
    so peak memory is what an inference run holds."""
    for mod in model.modules():
        if type(mod).__name__ == "QuantLinear" and hasattr(mod, "set_backend"):
            mod.set_backend(backend, keep_checkpoint=False)


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


def model_dtype(model) -> torch.dtype:
    """The activation / KV-cache dtype: the embedding's (Int4 layers keep int32 buffers)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())

