"""Atomic file writes: a temporary file beside the target, then a rename.

A reader (or a run interrupted half-way) never sees half a file: every JSON, table, report and cache
file the tools write goes through here.
"""

from __future__ import annotations

import contextlib
import os
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
