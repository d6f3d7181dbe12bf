"""Load any model a MODEL argument names: full precision (hub, folder, GGUF, demo, synthetic) as a transformers
model, or a quantized checkpoint through kernels.load_quantized; with its tokenizer and a description that
every checkpoint and report carries (so a synthetic model is never mistaken for a real one).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from qwen_quant.errors import UserError
from qwen_quant.workarounds import canonical_lm_head_input
from qwen_quant.models.specs import ModelRef, ModelSpec, check_fp_config, parse_model_spec, read_config, resolve
from qwen_quant.models.tokenizers import TiktokenQwen, encode_text


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    tokenizer: object  # HF tokenizer, or TiktokenQwen for synthetic models
    description: dict  # goes into every report: source, synthetic flag, base model, license

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def load_model(spec: str | ModelSpec, dtype=None, device: str = "cpu", trust_remote_code: bool = False,
               gguf_file: str | None = None, seed: int = 0) -> LoadedModel:
    """A full-precision model (hub, folder, GGUF, demo, synthetic) as a transformers model on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(spec, str):
        spec = parse_model_spec(spec, gguf_file)
    if spec.kind == "synthetic":
        from qwen_quant.models.synthetic import SYNTHETIC_SHAPES, build_synthetic

        model = build_synthetic(spec.shape, dtype=dtype or torch.bfloat16, device=device, seed=seed)
        desc = {"source": spec.name, "synthetic": True,
                "note": "SYNTHETIC random weights at a real shape: for speed and memory only, never accuracy",
                "shape": spec.shape, "layout": SYNTHETIC_SHAPES[spec.shape]["layout"]}
        return LoadedModel(canonical_lm_head_input(model), spec, TiktokenQwen(), desc)

    if spec.kind == "demo":
        from qwen_quant.models.demo import DEMO_NAME, DEMO_PACKAGE, demo_model_dir

        path, kw = str(demo_model_dir()), {}
        desc = {"source": f"demo: {DEMO_NAME} from the {DEMO_PACKAGE} package (GGUF Q4_1 dequantized to fp32)",
                "synthetic": False, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    elif spec.kind == "gguf":
        path, kw = spec.path, {"gguf_file": spec.gguf_file}
        if not os.path.isfile(os.path.join(path, spec.gguf_file)) and not os.path.isdir(path):
            raise UserError(f"GGUF file {os.path.join(path, spec.gguf_file)} not found")
        desc = {"source": f"gguf: {os.path.join(path, spec.gguf_file)} (dequantized by transformers)", "synthetic": False}
    else:
        config = read_config(spec)
        if spec.kind == "dir" and config is None:
            raise UserError(f"{spec.path} has no config.json: not a Hugging Face model folder")
        check_fp_config(config, spec.name, trust_remote_code)
        path, kw = local_folder(spec), {"trust_remote_code": trust_remote_code}
        desc = {"source": spec.name, "synthetic": False, "base_model": spec.path if spec.kind == "hub" else None,
                "license": (config or {}).get("license")}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kw)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {spec.name!r}: {msg}") from None
    if spec.kind == "gguf":
        from qwen_quant.models.demo import strip_gguf_quant_state

        strip_gguf_quant_state(model)
    model.eval()
    if device != "cpu":
        model.to(device)
    return LoadedModel(canonical_lm_head_input(model), spec, tok, desc)


def local_folder(spec: ModelSpec) -> str:
    """A folder on this machine with the model's files: a dir as it is, a hub id's snapshot (downloaded once)."""
    if spec.kind == "hub":
        from qwen_quant.hub import snapshot

        return str(snapshot(spec.path))
    if spec.kind == "demo":
        from qwen_quant.models.demo import demo_model_dir

        return str(demo_model_dir())
    return spec.path


def load(model: str | ModelRef, dtype=None, device: str = "cpu", backend: str = "auto",
         trust_remote_code: bool = False, seed: int = 0, keep_checkpoint: bool = True) -> LoadedModel:
    """Any MODEL: a quantized checkpoint through load_quantized (Int4 kernels, `backend`), anything else through
    load_model. dtype None: a checkpoint's default (fp16 on a GPU, bf16 on the CPU), an fp model's own.
    keep_checkpoint=False: an Int4 model for inference only, holding its repacked weights and nothing else."""
    ref = model if isinstance(model, ModelRef) else resolve(model)
    if not ref.quantized:
        return load_model(ref.spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code, seed=seed)
    from transformers import AutoTokenizer

    from qwen_quant.kernels.loader import load_quantized

    folder = local_folder(ref.spec)
    net = load_quantized(folder, backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                         keep_checkpoint=keep_checkpoint)
    if ref.synthetic:
        tok = TiktokenQwen() if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")) else \
            AutoTokenizer.from_pretrained(folder)
    else:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    qcfg = ref.config["quantization_config"]
    desc = {"source": ref.text, "quantized": True, "synthetic": ref.synthetic, "backend": backend,
            "quantization": {k: qcfg.get(k) for k in ("quant_method", "bits", "group_size", "sym", "desc_act",
                                                      "damp_percent", "checkpoint_format")}}
    return LoadedModel(net, ref.spec, tok, desc)
