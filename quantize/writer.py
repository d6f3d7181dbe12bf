"""Writes a GPTQ v1 checkpoint (shared FORMAT.md) atomically, one tensor in memory at a time.

Safetensors is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and the
raw bytes. Because every tensor's shape and dtype are known before any is loaded, a shard is written
as a stream: header first, then each tensor read, converted, written and freed. The same format is
read back with plain file reads (`SafetensorsFolder`), which keeps shard pages out of our RSS.

The checkpoint is assembled in a temporary folder beside the target and renamed at the end, so an
interrupted or failed write never leaves a half checkpoint; a full disk removes the temporary folder
and leaves the target untouched.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch

from qwen_quant.errors import UserError
from qwen_quant.files import make_ordinary, replace_dir

_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
           torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}

# Files of a model folder that travel with the checkpoint (tokenizer, generation config, remote code).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                "chat_template.json", "generation_config.json", "qwen.tiktoken")


# ---------------------------------------------------------------- reading

class SafetensorsFolder:
    """The tensors of a folder's *.safetensors files, read one at a time without mmap."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
        if not files:
            hint = " (pickle .bin weights are not read: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
            raise UserError(f"{folder} has no *.safetensors weights{hint}")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, data_start = read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, info, data_start)

    def names(self) -> list[str]:
        return list(self._where)

    def shape_dtype(self, name: str) -> tuple[tuple, torch.dtype]:
        _, info, _ = self._entry(name)
        return tuple(info["shape"]), _FROM_NAME[info["dtype"]]

    def float_dtype(self) -> torch.dtype:
        for name in self._where:
            _, dtype = self.shape_dtype(name)
            if dtype.is_floating_point:
                return dtype
        return torch.float16

    def _entry(self, name):
        if name not in self._where:
            raise UserError(f"tensor {name} is missing from the model's safetensors files: the checkpoint is incomplete")
        return self._where[name]

    def read(self, name: str) -> torch.Tensor:
        path, info, data_start = self._entry(name)
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{path} is truncated (tensor {name}): re-download or re-save the model")
        dtype = _FROM_NAME[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        size = os.path.getsize(path)
        for name, info in header.items():
            if name != "__metadata__" and (info["dtype"] not in _FROM_NAME or 8 + n + info["data_offsets"][1] > size):
                raise ValueError(f"bad entry {name}")
    except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}): re-download or re-save the model") from None
    return header, 8 + n


# ---------------------------------------------------------------- streaming write

@dataclasses.dataclass
class TensorEntry:
    """A tensor to write: known shape and dtype, loaded only when its bytes are written."""

    name: str
    shape: tuple
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, entries: list[TensorEntry], metadata: dict | None = None) -> None:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for e in entries:
        header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.load().detach().to("cpu", e.dtype).contiguous()
            if tuple(t.shape) != tuple(e.shape):
                raise RuntimeError(f"{e.name}: shape {tuple(t.shape)} differs from the planned {e.shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t


def parse_size(text) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size: write e.g. 2GB, 500MB or 1GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(folder: Path, entries: list[TensorEntry], max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus model.safetensors.index.json."""
    shards = plan_shards(entries, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard, meta)
        names.append(fname)
        weight_map.update({e.name: fname for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


# ---------------------------------------------------------------- the whole checkpoint, atomically

def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a non-empty target unless overwrite (called before anything is loaded)."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is a file: choose another --out")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{target} exists and is not empty: pass --overwrite or choose another --out")


class DiskFullError(UserError):
    """The disk filled up while writing; temporary files are already removed."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))


def write_checkpoint(target: Path, entries: list[TensorEntry], files: dict[str, str | bytes | Path],
                     max_shard_bytes: int, overwrite: bool) -> Path:
    """Write weights and the given small files into a temp folder beside `target`, then rename it in.

    `files`: name -> text, bytes, or a Path to copy. Any failure removes the temp folder; the target is
    only replaced by a complete checkpoint.
    """
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=str(target.parent)))
    try:
        make_ordinary(tmp, directory=True)  # a checkpoint is an ordinary folder
        write_weights(tmp, entries, max_shard_bytes)
        for name, content in files.items():
            dest = tmp / name
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            elif isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                dest.write_text(content)
        replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(f"disk full while writing the checkpoint beside {target}: free some space and run again "
                            f"(nothing was written to {target})") from None
        raise
    return target
