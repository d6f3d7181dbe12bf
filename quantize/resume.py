"""Per-block state of a quantization run, kept in a hidden folder beside the target so `--resume` works.

    .<target>.qwen-quant-state/
        manifest.json           what this state belongs to (settings, model, calibration, start date)
        block-00007.safetensors the finished block's checkpoint tensors
        block-00007.json        its per-layer stats
        head.safetensors        the quantized lm_head (--lm-head), once the last block is done
        inputs.safetensors      the next block's inputs (hidden states), with the block they feed

Everything is written through a temporary file and a rename, so an interrupted write never leaves a
half file that a resume would trust. The uninterrupted run goes through the same files, which is why
a resumed run writes the same checkpoint bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen_quant.errors import UserError
from qwen_quant.files import atomic_path, write_bytes_atomic

# Saving the hidden states costs disk time on big models: save them after every block while they
# are small, otherwise at most every SAVE_INTERVAL_S (a resume then redoes the blocks since).
SMALL_INPUTS_BYTES = 1 << 30
SAVE_INTERVAL_S = 300.0


def state_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.qwen-quant-state"


def calibration_fingerprint(calib) -> str:
    h = hashlib.sha256()
    h.update(calib.input_ids.to(torch.int64).numpy().tobytes())
    h.update(calib.attention_mask.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_save_tensors(path: Path, tensors: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def run_date() -> str:
    """UTC now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention: same bytes every run)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch.isdigit()
            else datetime.datetime.now(datetime.timezone.utc))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class RunState:
    """The state folder of one run: which blocks are done, their tensors, the next block's inputs."""

    def __init__(self, target: Path, identity: dict, resume: bool, say=print):
        self.dir = state_dir_for(target)
        self.identity = identity  # settings, model, calibration fingerprint: must match to resume
        self._last_inputs_save = time.monotonic()
        manifest = self.dir / "manifest.json"
        if resume and manifest.is_file():
            old = json.loads(manifest.read_text())
            if old.get("identity") != identity:
                diff = sorted(k for k in set(identity) | set(old.get("identity", {}))
                              if identity.get(k) != old.get("identity", {}).get(k))
                raise UserError(f"cannot resume: the interrupted run used different {', '.join(diff)}; "
                                f"repeat its settings, or drop --resume to start over")
            self.date = old["date"]
        else:
            if resume:
                say(f"nothing to resume in {self.dir}: starting from block 0")
            self.discard()
            self.dir.mkdir(parents=True)
            self.date = run_date()
            write_bytes_atomic(manifest, json.dumps({"identity": identity, "date": self.date}, indent=1).encode())

    def _block(self, i: int, ext: str) -> Path:
        return self.dir / f"block-{i:05d}.{ext}"

    def first_unfinished(self) -> int:
        """The block after the last one whose inputs for the next block were saved."""
        p = self.dir / "inputs.json"
        if not p.is_file():
            return 0
        n = json.loads(p.read_text())["next_block"]
        return n if all(self._block(i, "json").is_file() for i in range(n)) else 0

    def load_inputs(self, device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The next block's inputs, and the fp model's (asymmetric calibration; None otherwise)."""
        saved = load_file(str(self.dir / "inputs.safetensors"))
        unstack = (lambda t: [h.unsqueeze(0).to(device) for h in t])
        return unstack(saved["hidden"]), (unstack(saved["fp_hidden"]) if "fp_hidden" in saved else None)

    def block_stats(self, i: int) -> list[dict]:
        from qwen_quant.quantize.pipeline import LayerStats

        return [LayerStats(**d) for d in json.loads(self._block(i, "json").read_text())]

    def save_block(self, i: int, tensors: dict, stats: list[dict], next_inputs: list[torch.Tensor], last: bool,
                   fp_inputs: list[torch.Tensor] | None = None) -> None:
        _atomic_save_tensors(self._block(i, "safetensors"), tensors)
        write_bytes_atomic(self._block(i, "json"), json.dumps(stats, indent=1).encode())
        if last:
            return
        streams = {"hidden": next_inputs} | ({"fp_hidden": fp_inputs} if fp_inputs is not None else {})
        nbytes = sum(h.numel() * h.element_size() for hs in streams.values() for h in hs)
        if nbytes <= SMALL_INPUTS_BYTES or time.monotonic() - self._last_inputs_save >= SAVE_INTERVAL_S:
            _atomic_save_tensors(self.dir / "inputs.safetensors",
                                 {k: torch.cat([h.cpu() for h in hs]) for k, hs in streams.items()})
            write_bytes_atomic(self.dir / "inputs.json", json.dumps({"next_block": i + 1}).encode())
            self._last_inputs_save = time.monotonic()

    def save_head(self, tensors: dict, stats: dict) -> None:
        """The quantized lm_head (--lm-head): written after the last block, read by the checkpoint writer."""
        _atomic_save_tensors(self.head_file(), tensors)
        write_bytes_atomic(self.dir / "head.json", json.dumps([stats], indent=1).encode())

    def head_file(self) -> Path:
        return self.dir / "head.safetensors"

    def block_file(self, i: int) -> Path:
        return self._block(i, "safetensors")

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
