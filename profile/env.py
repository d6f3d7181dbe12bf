"""The environment record that every result file carries (qwen-profile, qwen-eval, qwen-report).

Collected without touching CUDA: versions come from package metadata, the GPU name and driver
from NVML (a CUDA context would leak memory state into the parent of the measured subprocesses).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import shlex
import sys
from pathlib import Path

from qwen_quant.provenance import git_commit


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
        "qwen_quant": _version("qwen-quant"),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
    }
