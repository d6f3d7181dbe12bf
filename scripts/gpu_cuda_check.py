#!/usr/bin/env python3
"""GPU check of the CUDA C++ Int4 backend: build, self-check, correctness sweep, quick timing.

    python scripts/gpu_cuda_check.py OUT_DIR            # on a GPU machine (~30 s of GPU time)
    python scripts/gpu_cuda_check.py OUT_DIR --dry-run  # CPU: build for sm_80/sm_90a + emulated sweep

Writes OUT_DIR/cuda_check.json. Correctness: every variant vs a float64 reference with the stated
tolerance (ulp(dtype)*|ref| + 2^-18*(|x|@|W|^T)), output poisoned with NaN before each run, odd N,
groups 32/64/128/-1, act-order, batch 1..16, fp16 and bf16, plus a CUDA-graph replay. Timing: each
variant vs torch bf16 matmul at the Qwen-7B MLP shapes, L2-cold (rotating weight copies, several
times the L2 size), launched from a CUDA graph so Python overhead is not measured, next to the
measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from qwen_quant.kernels import cuda_backend as cb

SWEEP = [  # K, N, group, act_order
    (64, 16, 32, False), (128, 40, 32, True), (192, 24, 64, True), (576, 72, 128, False),
    (256, 8, -1, False), (576, 24, -1, True), (192, 40, 48, True), (512, 200, 128, True),
    (1024, 1000, 128, False), (4096, 344, 128, True), (11008, 64, 128, True),
]
SWEEP_ROWS = (1, 2, 3, 4, 7, 8, 9, 15, 16)
DRY_SWEEP_ROWS = (1, 9, 16)
QWEN7B_MLP = {"mlp.up/gate 4096x11008": (4096, 11008), "mlp.down 11008x4096": (11008, 4096)}
TIMING_ROWS = (1, 4, 16)


def provenance(args) -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            return None

    nvcc = cb.find_nvcc()
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "HEAD"]),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "nvcc": (run([nvcc, "--version"]) or "").splitlines()[-1:] if nvcc else None,
        "dry_run": args.dry_run,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", None),
                    driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return info


def build_step(dry_run: bool) -> dict:
    if dry_run or not torch.cuda.is_available():
        archs = cb.CI_ARCHS
    else:
        archs = (cb.arch_for_capability(*torch.cuda.get_device_capability()),)
    start = time.perf_counter()
    built = cb.build_library(archs=archs, force=True)
    lib = cb.KernelLibrary(built.path)
    spills = [line.strip() for line in built.log.splitlines() if "spill stores" in line and "0 bytes spill" not in line]
    regs = sorted({int(line.split("Used ")[1].split(" ")[0]) for line in built.log.splitlines() if "Used " in line})
    return {"archs": list(archs), "seconds": round(time.perf_counter() - start, 2), "library": str(built.path),
            "abi": lib.lib.qq_int4_abi_version(), "spilling_kernels": spills, "registers_used": regs}


def layer_on(device, k_total, n, group, act, seed):
    layer = cb.random_layer(k_total, n, group, act, seed=seed)
    tensors = [layer[key].to(device) for key in ("qweight", "qzeros", "scales", "g_idx")]
    truth = (layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
    return tensors, truth


def sweep_step(dry_run: bool) -> dict:
    """Every variant x shape x batch x dtype vs float64; GPU runs the kernels, dry-run the emulators."""
    on_gpu = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if on_gpu else "cpu")
    runtime = cb._get_runtime() if on_gpu else None
    variants = runtime.good if on_gpu else cb.VARIANTS
    cases = SWEEP if on_gpu else SWEEP[:5]
    results, failures, worst = 0, [], {}
    for ci, (k_total, n, group, act) in enumerate(cases):
        tensors, truth = layer_on(device, k_total, n, group, act, seed=ci)
        for variant in variants:
            state = cb.relayout(*tensors, group_size=group, v1=True, variant=variant)
            for rows in (SWEEP_ROWS if on_gpu else DRY_SWEEP_ROWS):
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(rows, k_total, generator=torch.Generator().manual_seed(rows + ci)).to(dtype)
                    ref, abs_ref = cb.reference_matmul(x, *truth), cb.reference_matmul(x, *truth, absolute=True)
                    if on_gpu:
                        out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)  # poison
                        cb._launch(runtime.library, variant, x.to(device), state, out)
                        got = out.double().cpu()
                        tol = cb.output_tolerance(ref, abs_ref, dtype)
                    else:
                        got = cb.emulate(x, state, variant)
                        tol = 1e-9 * ref.abs() + 1e-12
                    err = (got - ref).abs().nan_to_num(float("inf"))
                    ratio = float((err / tol).max())
                    worst[variant] = max(worst.get(variant, 0.0), ratio)
                    results += 1
                    if not ratio <= 1.0:
                        failures.append(dict(variant=variant, K=k_total, N=n, group=group, act_order=act, M=rows,
                                             dtype=str(dtype), max_err=float(err.max()), err_over_tol=ratio))
    return {"mode": "gpu kernels" if on_gpu else "cpu emulation", "checked": results, "failures": failures[:20],
            "n_failures": len(failures), "worst_err_over_tol": worst,
            "tolerance": "ulp(dtype)*|ref| + 2^-18*(|x|@|W|^T) + 1e-6" if on_gpu else "1e-9 relative (float64)"}


def graph_step() -> dict:
    device = torch.device("cuda")
    tensors, _ = layer_on(device, 512, 200, 128, True, seed=7)
    out = {}
    for variant in cb._get_runtime().good:
        state = cb.relayout(*tensors, group_size=128, v1=True, variant=variant)
        x = torch.randn(5, 512, device=device, dtype=torch.bfloat16)
        eager = cb.matmul(x, state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = cb.matmul(x, state)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        out[variant] = bool(torch.equal(captured, cb.matmul(x, state))) and not torch.equal(captured, eager)
    return out


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / sorted(times)[len(times) // 2] / 1e9  # read + write


def graph_time_us(calls, reps: int = 3) -> dict:
    """Median/min/max µs per call of `calls` (rotating through weight copies) replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(calls))
    samples.sort()
    return {"median_us": round(samples[len(samples) // 2], 2), "min_us": round(samples[0], 2),
            "max_us": round(samples[-1], 2)}


def timing_step(budget_s: float) -> dict:
    device = torch.device("cuda")
    deadline = time.perf_counter() + budget_s
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    bandwidth = copy_bandwidth_gbs()
    cells = []
    for label, (k_total, n) in QWEN7B_MLP.items():
        if time.perf_counter() > deadline:
            break
        gen = torch.Generator(device=device).manual_seed(0)
        qweight = torch.randint(-2**31, 2**31 - 1, (k_total // 8, n), device=device, dtype=torch.int32, generator=gen)
        qzeros = torch.randint(-2**31, 2**31 - 1, (k_total // 128, n // 8), device=device, dtype=torch.int32, generator=gen)
        scales = (torch.rand(k_total // 128, n, device=device, generator=gen) * 0.01).half()
        int4_bytes = k_total * n // 2 + 2 * scales.numel() * 2
        copies_int4 = max(2, -(-4 * l2 // int4_bytes))  # the weights that one graph touches exceed L2 4x
        bf16_bytes = k_total * n * 2
        copies_bf16 = max(2, -(-4 * l2 // bf16_bytes))
        base = cb.relayout(qweight, qzeros, scales, None, group_size=128, v1=True, variant="mma")
        states = [base] + [dataclasses.replace(base, weight=base.weight.clone(), groups=base.groups.clone())
                           for _ in range(copies_int4 - 1)]
        dense = [torch.randn(n, k_total, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies_bf16)]
        for rows in TIMING_ROWS:
            x = torch.randn(rows, k_total, device=device, dtype=torch.bfloat16)
            cell = {"shape": label, "K": k_total, "N": n, "M": rows}
            bf16 = graph_time_us([lambda w=w: torch.matmul(x, w.T) for w in dense] * 2)
            cell["bf16_matmul"] = {**bf16, "gbs": round(bf16_bytes / bf16["median_us"] / 1e3, 1)}
            for variant in cb._get_runtime().good:
                t = graph_time_us([lambda s=s, v=variant: cb.matmul(x, s, v) for s in states] * 2)
                gbs = int4_bytes / t["median_us"] / 1e3
                cell[variant] = {**t, "gbs": round(gbs, 1), "pct_of_copy_bw": round(100 * gbs / bandwidth, 1),
                                 "speedup_vs_bf16": round(bf16["median_us"] / t["median_us"], 2)}
            cells.append(cell)
        del states, dense, base
        torch.cuda.empty_cache()
    return {"copy_bandwidth_gbs": round(bandwidth, 1), "l2_bytes": l2, "cells": cells,
            "note": "µs per call from CUDA-graph replays over rotating weight copies (L2-cold); "
                    "gbs counts Int4 codes + fp16 scales/zeros, bf16 counts the dense weight"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build for sm_80/sm_90a and run the emulated sweep")
    parser.add_argument("--timing-budget-s", type=float, default=12.0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"provenance": provenance(args)}
    t0 = time.perf_counter()

    def step(name, fn, *a):
        start = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception as exc:  # record and go on: one broken step must not hide the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - start, 2)
        print(f"[{name}] {json.dumps(report[name])[:600]}", flush=True)
        write(args.out_dir, report)

    step("build", build_step, args.dry_run)
    ok, reason = cb.available() if not args.dry_run else (False, "dry run")
    report["available"] = {"ok": ok, "reason": reason}
    print(f"[available] {ok} {reason}", flush=True)
    step("sweep", sweep_step, args.dry_run or not ok)
    if ok:
        step("graph_capture", graph_step)
        step("timing", timing_step, args.timing_budget_s)
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    write(args.out_dir, report)
    failed = report.get("sweep", {}).get("n_failures", 1) != 0 or "error" in report.get("sweep", {})
    print(f"wrote {args.out_dir / 'cuda_check.json'} in {report['total_seconds']} s; sweep "
          f"{'FAILED' if failed else 'ok'}", flush=True)
    return 1 if failed else 0


def write(out_dir: Path, report: dict) -> None:
    tmp = out_dir / "cuda_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out_dir / "cuda_check.json")


if __name__ == "__main__":
    sys.exit(main())
