"""Peak memory of one cell, three ways: allocator (peak allocated / reserved), NVML process memory, host RSS.

Runs inside the cell's own subprocess: `MemoryProbe.start()` resets the peaks after the model is
built and warmed up, `stop()` reads them. NVML and RSS are sampled by a background thread; RSS also
uses the kernel's high-water mark (reset through /proc/self/clear_refs), which no sampler can miss.
"""

from __future__ import annotations

import os
import threading

GIB = 2 ** 30


def _gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _NvmlReader:
    """Used GPU memory of this process (falls back to the whole device where PIDs are not visible)."""

    def __init__(self, device_index: int):
        import pynvml  # nvidia-ml-py, optional: only on GPU runs

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._pid = os.getpid()
        self.scope = "process"

    def read(self) -> int:
        nv = self._nvml
        try:
            for p in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid == self._pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
        except nv.NVMLError:
            pass
        self.scope = "device"  # in a container NVML may not see our PID: report the device's use
        return int(nv.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self):
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class MemoryProbe:
    """Start after warm-up, stop after the timed repeats; `stop()` returns the cell's memory fields."""

    def __init__(self, device: str, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        self._peak_nvml = 0
        self._peak_rss = 0
        self._hwm_ok = False

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def start(self) -> "MemoryProbe":
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                self._nvml = _NvmlReader(torch.cuda.current_device())
            except Exception:
                self._nvml = None  # no nvidia-ml-py or no NVML: peak_nvml_gib stays null
        self._hwm_ok = _reset_rss_high_water_mark()
        self._peak_rss = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval_s)

    def _sample_once(self):
        self._peak_rss = max(self._peak_rss, current_rss_bytes())
        if self._nvml is not None:
            try:
                self._peak_nvml = max(self._peak_nvml, self._nvml.read())
            except Exception:
                pass

    def stop(self) -> dict:
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_once()
        hwm_kib = _proc_status_kib("VmHWM") if self._hwm_ok else None
        peak_rss = max(self._peak_rss, (hwm_kib or 0) * 1024)
        out = {"peak_allocated_gib": None, "peak_reserved_gib": None, "peak_nvml_gib": None,
               "peak_rss_gib": _gib(peak_rss), "nvml_scope": None}
        if self.on_gpu:
            import torch

            out["peak_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
            out["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
            if self._nvml is not None:
                out["peak_nvml_gib"] = _gib(self._peak_nvml)
                out["nvml_scope"] = self._nvml.scope
                self._nvml.close()
        return out


def apply_memory_cap(device: str, cap_gib: float | None) -> None:
    """Cap this process's memory so a cell that needs more fails with an out-of-memory error.

    GPU: the allocator's per-process fraction. CPU: the address-space limit, set to what is mapped
    now plus the headroom left under the cap (the model is already resident, so it counts).
    """
    if not cap_gib:
        return
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
        return
    import resource

    mapped = (_proc_status_kib("VmSize") or 0) * 1024
    headroom = max(0, int(cap_gib * GIB) - current_rss_bytes())
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))


def is_out_of_memory(exc: BaseException) -> bool:
    """Out-of-memory on any device: torch's OOM error, MemoryError, or a CPU allocator failure."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)
