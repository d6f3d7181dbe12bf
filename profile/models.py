"""Which precisions a profiled model has, and the model in one of them.

Checked in the parent (`resolve_model`, `check_precision`: cheap, no weights) so bad input fails
before any cell starts; built in each cell's subprocess (`build_model`) through models/: what a MODEL
argument is, and how it loads, is decided there (a synthetic model's Int4 form: models/synthetic.py).
"""

from __future__ import annotations

import dataclasses

import torch

from qwen_quant.errors import UserError
from qwen_quant.models.synthetic import reset_rotary

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
    from qwen_quant.models.specs import resolve

    ref = resolve(text)
    return ModelInfo(text, ref.label, ref.spec.kind, ref.quantized)


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
        from qwen_quant.models.load import load

        model = load(info.model, dtype=int4_compute_dtype(device), device=device, backend=backend,
                     keep_checkpoint=False).model
    elif info.kind == "synthetic" and precision == "int4":
        from qwen_quant.models.synthetic import build_synthetic_int4

        model = build_synthetic_int4(info.model.split(":", 1)[1], device, int4_compute_dtype(device), backend,
                                     seed=seed, group_size=INT4_GROUP_SIZE)
        _free_unused_quant_buffers(model, backend)
    else:
        from qwen_quant.models.load import load_model

        model = load_model(info.model, dtype=DTYPES[precision], device=device, seed=seed).model
        if info.kind == "synthetic":
            reset_rotary(model)
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
    in bf16 on the CPU (what the CPU backend's int4 kernel takes)."""
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def _free_unused_quant_buffers(model, backend: str) -> None:
    """Each Int4 layer keeps only what its kernel reads (a repacking backend drops the checkpoint copy),
    so peak memory is what an inference run holds."""
    for mod in model.modules():
        if type(mod).__name__ == "QuantLinear" and hasattr(mod, "set_backend"):
            mod.set_backend(backend, keep_checkpoint=False)


def model_dtype(model) -> torch.dtype:
    """The activation / KV-cache dtype: the embedding's (Int4 layers keep int32 buffers)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())

