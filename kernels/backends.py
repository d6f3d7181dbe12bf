"""The one place that chooses a kernel backend for a quantized linear.

`select_backend` returns a plan: an ordered list of (max_rows, backend name); a forward call uses the
first entry whose max_rows covers its row count (None = any). `auto` picks by device, batch size,
bits, divisibility (each backend's supports()) and availability:
    cpu  -> cpu (torch's int4 kernel; 4-bit, groups of 32k) when available, torch otherwise
    cuda -> cuda (CUDA C++) for <= 16 rows when available and supported, triton otherwise,
            torch when neither supports the layer.
A forced backend that cannot run is a one-line UserError.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from qwen_quant.errors import UserError

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")
CUDA_MAX_ROWS = 16  # the CUDA C++ kernel is a batch 1-16 decode kernel

_MODULES = {"torch": "torch_backend", "cpu": "cpu_backend", "triton": "triton_backend", "cuda": "cuda_backend"}
_said: set[str] = set()


def backend_module(name: str):
    """The backend module (available/supports/prepare/matmul); None when it is not installed."""
    try:
        return importlib.import_module(f"qwen_quant.kernels.{_MODULES[name]}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def backend_available(name: str) -> tuple[bool, str]:
    module = backend_module(name)
    if module is None:
        return False, f"qwen_quant.kernels.{_MODULES[name]} is not installed"
    try:
        return module.available()
    except Exception as exc:  # a broken toolchain must never take the model down with it
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)


def _supports(name: str, k: int, n: int, bits: int, group_size: int, desc_act: bool) -> bool:
    try:
        return bool(backend_module(name).supports(k, n, bits, group_size, desc_act))
    except Exception:
        return False


def select_backend(requested: str, device: torch.device | str, in_features: int, out_features: int,
                   bits: int, group_size: int, desc_act: bool) -> list[tuple[int | None, str]]:
    """The plan for one layer: [(max_rows or None, backend name), ...]."""
    if requested not in BACKEND_NAMES:
        raise UserError(f"unknown backend {requested!r}; use one of {', '.join(BACKEND_NAMES)}")
    device = torch.device(device)
    shape = (in_features, out_features, bits, group_size, desc_act)
    if requested != "auto":
        ok, reason = backend_available(requested)
        if not ok:
            raise UserError(f"backend {requested!r} is not available here ({reason}); use --backend auto")
        if requested == "cuda" and device.type != "cuda":
            raise UserError(f"backend 'cuda' needs the model on a CUDA device, not {device}; use --backend auto")
        if requested == "cpu" and device.type != "cpu":
            raise UserError(f"backend 'cpu' needs the model on the CPU, not {device}; use --backend auto")
        if requested == "triton" and device.type != "cuda" and "interpreter" not in reason:
            raise UserError(f"backend 'triton' needs a CUDA device, not {device}; use --backend auto")
        if not _supports(requested, *shape):
            raise UserError(f"backend {requested!r} does not support a {in_features}x{out_features} layer with "
                            f"bits={bits}, group_size={group_size}, desc_act={desc_act}; use --backend auto")
        return [(None, requested)]
    if device.type != "cuda":
        cpu_ok, _ = backend_available("cpu")
        return [(None, "cpu" if device.type == "cpu" and cpu_ok and _supports("cpu", *shape) else "torch")]
    plan: list[tuple[int | None, str]] = []
    cuda_ok, cuda_reason = backend_available("cuda")
    if not cuda_ok:
        _say_once(f"CUDA C++ int4 kernel unavailable ({cuda_reason}); using the Triton backend")
    elif _supports("cuda", *shape):
        plan.append((CUDA_MAX_ROWS, "cuda"))
    triton_ok, triton_reason = backend_available("triton")
    if triton_ok and _supports("triton", *shape):
        plan.append((None, "triton"))
    else:
        if not triton_ok:
            _say_once(f"Triton int4 kernel unavailable ({triton_reason}); using the torch backend")
        plan.append((None, "torch"))
    return plan
