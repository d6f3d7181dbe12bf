"""Per-item results on disk, so a stopped evaluation resumes and a table grows across runs.

Each (model, task) has one JSON-lines file under `<out>/items/`: a header line that says which model
and settings produced it, then one line per scored item (a perplexity window, a question, a problem),
appended and flushed as soon as the item is scored. A later run with the same --out reads the file
back and scores only what is missing. The file name carries a hash of everything that changes the
numbers (the model's files, dtype, kernel backend, device type, the task's settings): a different
model or setting gets a different file, so results are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

# Weight files are identified by name, size and a hash of their first bytes: enough to tell two
# checkpoints apart without reading gigabytes each run.
HEAD_BYTES = 1 << 22


def model_fingerprint(spec: str, folder: str | None) -> str:
    """A hash of a model folder's config and weight files, wherever the folder is (a checkpoint moved or linked
    elsewhere keeps its stored results); of the spec itself when it names nothing on this machine (a hub id)."""
    h = hashlib.sha256(b"" if folder and Path(folder).exists() else spec.encode())
    if folder and Path(folder).is_dir():
        root = Path(folder)
        for p in sorted(root.iterdir()):
            if p.name == "config.json":
                h.update(p.read_bytes())
            elif p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file():
                h.update(f"{p.name}:{p.stat().st_size}".encode())
                with open(p, "rb") as f:
                    h.update(f.read(HEAD_BYTES))
    elif folder and Path(folder).is_file():
        p = Path(folder)
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(HEAD_BYTES))
    return h.hexdigest()[:16]


class ItemStore:
    """Scored items of one model, one file per task. `root` None keeps nothing (no --out)."""

    def __init__(self, root: Path | None, label: str, identity: dict):
        self.root, self.label, self.identity = root, label, identity

    def _path(self, task_key: dict) -> Path:
        key = json.dumps({"model": self.identity, "task": task_key}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.label}--{task_key['task']}")
        return self.root / "items" / f"{safe}--{digest}.jsonl"

    def load(self, task_key: dict) -> dict[str, dict]:
        """item key -> its stored result (empty when nothing was stored)."""
        if self.root is None:
            return {}
        path = self._path(task_key)
        if not path.is_file():
            return {}
        done = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill: that item is scored again
                    continue
                if "item" in record:
                    done[record["item"]] = record["result"]
        return done

    def add(self, task_key: dict, results: dict[str, dict]) -> None:
        """Append scored items (item key -> JSON-able result) and flush them to disk."""
        if self.root is None or not results:
            return
        path = self._path(task_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"model": self.identity, "task": task_key, "label": self.label}) + "\n")
            for item, result in results.items():
                f.write(json.dumps({"item": item, "result": result}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def results(self, task_key: dict, keys: Sequence[str], score: Callable[[list[int]], list[dict]], chunk: int,
                desc: str) -> list[dict]:
        """Every item's result, in `keys` order: stored ones read back, the rest scored `chunk` items at a time
        by `score(indices) -> results` and stored as soon as each chunk is done (one progress bar over all)."""
        from tqdm.auto import tqdm

        from qwen_quant.cli_util import is_quiet

        done = self.load(task_key)
        missing = [i for i, k in enumerate(keys) if k not in done]
        bar = tqdm(total=len(keys), initial=len(keys) - len(missing), desc=desc, disable=is_quiet(), leave=False)
        for start in range(0, len(missing), chunk):
            picked = missing[start:start + chunk]
            scored = {keys[i]: result for i, result in zip(picked, score(picked))}
            self.add(task_key, scored)
            done.update(scored)
            bar.update(len(picked))
        bar.close()
        return [done[k] for k in keys]
