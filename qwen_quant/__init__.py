"""qwen-quant: GPTQ Int4 for Qwen models, fast Int4 kernels, and honest speed/memory/accuracy numbers.

Public API (imported lazily so `import qwen_quant` stays cheap):
    quantize(model, out, QuantSettings or its fields as keywords: bits=4, nsamples=128 ...) -> Path
    load_quantized(path_or_id, backend="auto", device="cpu") -> transformers model
    generate(model, prompt, max_new_tokens, ...) -> tokens / text
"""

__version__ = "0.1.0"

__all__ = ["quantize", "load_quantized", "generate", "QuantLinear", "__version__"]


def __getattr__(name):
    if name == "quantize":
        # the subpackage qwen_quant.quantize is itself callable (it forwards to quantize.api.quantize),
        # so `qwen_quant.quantize(...)` works before and after any submodule import
        import importlib
        return importlib.import_module("qwen_quant.quantize")
    if name == "load_quantized":
        from qwen_quant.kernels.loader import load_quantized
        return load_quantized
    if name == "QuantLinear":
        from qwen_quant.kernels.quant_linear import QuantLinear
        return QuantLinear
    if name == "generate":
        from qwen_quant.engine.generate import generate
        return generate
    raise AttributeError(f"module 'qwen_quant' has no attribute {name!r}")
