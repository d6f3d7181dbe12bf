"""Where a result came from: one collector for every result file (quant_report.json, qwen-profile's and
qwen-eval's results, the kernel benchmark, experiments).

`collect_env(argv)` records the machine (GPU, driver, CUDA or CPU), the library versions, the project's git
commit (flagged '+dirty' when the work tree differs from it), the date and the exact command. Read it when the
work starts: a commit made while a long run is going did not produce that run's numbers. Nothing here touches
CUDA: versions come from package metadata, the GPU name and driver from NVML (a CUDA context would leak
memory state into the parent of the measured subprocesses).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent



def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with '+dirty' when tracked files have changes; None outside
    a git checkout (an installed wheel). Changes under reports/ do not count: they are results (a report being
    re-rendered while a run starts), not the code that produces them."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
                               cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return _md.version(package)
    except _md.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_gpus() -> list[dict]:
    """[{name, memory_gib}] per GPU and the driver version, via NVML; [] where there is none."""
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"name": name.decode() if isinstance(name, bytes) else name,
                        "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2),
                        "driver": driver.decode() if isinstance(driver, bytes) else driver})
        return out
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built with (reading it does not initialize CUDA)."""
    try:
        import torch

        return torch.version.cuda
    except ImportError:
        return None


def collect_env(argv: list[str] | None = None) -> dict:
    """GPU/CPU, driver, CUDA, library versions, commit, date and the exact command line."""
    gpus = nvml_gpus()
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = os.path.basename(argv[0])
    return {
        "gpu": gpus[0]["name"] if gpus else None,
        "gpu_count": len(gpus),
        "gpu_memory_gib": gpus[0]["memory_gib"] if gpus else None,
        "driver": gpus[0]["driver"] if gpus else None,
        "cuda": torch_cuda_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "safetensors": _version("safetensors"),
        "qwen_quant": _version("qwen-quant"),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
    }
