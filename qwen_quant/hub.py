"""The one place that talks to the Hugging Face hub: one file of a repository, or a snapshot of its files.

huggingface_hub retries a failed connection for about half a minute before it gives up. When there is no
network at all (the hub's host name does not resolve) we know at once: then files come from the local
Hugging Face cache only, and a repository that is not there is one clear line, not a wait.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from qwen_quant.errors import UserError

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]
RESOLVE_TIMEOUT_S = 3.0


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> bool:
    """True when the hub's host name does not resolve (no network, or no DNS), decided within seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, hub_host(), 443).result(timeout=RESOLVE_TIMEOUT_S)
        return False
    except (OSError, concurrent.futures.TimeoutError):
        return True
    finally:
        pool.shutdown(wait=False)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or hub_unreachable()


def _fail(repo: str, exc: Exception) -> UserError:
    if _offline():
        why = "HF_HUB_OFFLINE is set" if not hub_unreachable() else f"no network (cannot resolve {hub_host()})"
        return UserError(f"{why}, and {repo} is not in the local Hugging Face cache: connect to the network, "
                         f"or pass a local folder")
    return UserError(f"cannot fetch {repo!r} from the Hugging Face hub ({type(exc).__name__}): check the id "
                     f"(org/name), your access to it and the network, or pass a local folder")


def fetch_file(repo: str, filename: str) -> Path:
    """One file of a hub repository (from the local cache when there is no network)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=_offline()))
    except Exception as exc:  # offline, unknown id, gated repo: huggingface_hub raises many kinds
        raise _fail(repo, exc) from None


def snapshot(repo: str, patterns: list[str] = MODEL_FILES) -> Path:
    """A local folder with the repository's files matching `patterns` (downloaded once into the HF cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=_offline()))
    except Exception as exc:
        raise _fail(repo, exc) from None
