#!/usr/bin/env python3
"""The one GPU step for the kernels (run once on an H100/H200; <= 120 s wall in total):

  (a) correctness of every backend (torch, triton, cuda when available) on CUDA against a float64
      dequantize-then-matmul reference: act-order, partial last groups, groups 32/64/128/-1, bits
      2/4/8, v1 and v2 zeros, bias, batch 1..33, fp16 and bf16;
  (b) CUDA-graph capture of the triton and cuda forwards (capture, replay, compare);
  (c) the kernel benchmark (kernels/bench.py) in the time left.

Writes OUT_DIR/gpu_kernels.json (+ the benchmark's .json/.md/.png). Exit code 1 when a correctness
check fails. `--dry-run`: CPU, TRITON_INTERPRET=1, tiny shapes (proves the script end to end).

    python scripts/gpu_kernels.py OUT_DIR [--budget 120] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--budget", type=float, default=120.0, help="wall seconds for everything (default 120)")
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402

from qwen_quant.kernels import format as fmt  # noqa: E402
from qwen_quant.kernels.backends import backend_available  # noqa: E402
from qwen_quant.kernels.quant_linear import QuantLinear  # noqa: E402

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (K, N, bits, group_size, act_order, bias, format)
GPU_CASES = [
    (4096, 4096, 4, 128, False, False, "gptq"), (4096, 11008, 4, 128, True, True, "gptq"),
    (11008, 4096, 4, 128, False, False, "gptq_v2"), (3584, 512, 4, 128, True, True, "gptq"),
    (576, 1536, 4, 128, False, True, "gptq"), (1536, 576, 4, 64, True, False, "gptq_v2"),
    (1000, 264, 4, 32, True, True, "gptq"), (2048, 1024, 4, -1, False, False, "gptq"),
    (2048, 1024, 2, 128, True, False, "gptq"), (1024, 520, 8, 64, False, True, "gptq_v2"),
]
DRY_CASES = [(576, 72, 4, 128, False, True, "gptq"), (256, 40, 4, 32, True, False, "gptq_v2")]
GPU_ROWS, DRY_ROWS = (1, 2, 3, 8, 16, 17, 33, 64), (1, 17)


def build(case, device, gen):
    k, n, bits, group_size, act, bias, fmt_name = case
    groups = fmt.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0 if fmt_name == "gptq_v2" else 1, 2**bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(k, group_size)
    if act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    layer = QuantLinear.from_quant(codes, scales, zeros, g_idx, b, bits, group_size, checkpoint_format=fmt_name)
    return layer.to(device)


def reference(layer, x, w64):
    y = x.double() @ w64.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    # output rounding + rounding of the dequantized weight to the activation dtype before the dot
    eps = EPS[x.dtype]
    spread = (x.double().pow(2) @ w64.pow(2).T).sqrt().max().item()
    return y, 2 * eps * y.abs().max().item() + 4 * eps * spread


def check_correctness(device, cases, rows_list, backends, deadline) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        layer = build(case, device, gen)
        w64 = fmt.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.in_features,
                             v1=layer.checkpoint_format == "gptq", dtype=torch.float64).to(device)
        for backend in backends:
            entry = {"case": list(case), "backend": backend}
            if time.perf_counter() > deadline:
                results.append({**entry, "status": "skipped"})
                continue
            try:
                layer.set_backend(backend)
            except Exception as exc:  # unsupported shape for a forced backend: recorded, not a failure
                results.append({**entry, "status": "unsupported", "error": str(exc).splitlines()[0]})
                continue
            worst, ok, error = 0.0, True, None
            try:
                for dtype in (torch.float16, torch.bfloat16):
                    for rows in rows_list:
                        x = torch.randn(rows, case[0], device=device, generator=None).to(dtype)
                        y = layer(x)
                        ref, tol = reference(layer, x, w64)
                        err = (y.double() - ref).abs().max().item()
                        worst = max(worst, err / tol)
                        ok = ok and err <= tol and y.dtype == dtype and bool(torch.isfinite(y).all())
            except Exception as exc:
                ok, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            results.append({**entry, "status": "ok" if ok else "FAIL", "worst_err_over_tol": worst,
                            "plan": layer.backend, **({"error": error} if error else {})})
    return results


def check_graph_capture(device, backends) -> list[dict]:
    """Capture one forward in a CUDA graph, change the input in place, replay, compare to eager."""
    out = []
    for backend in backends:
        try:
            layer = QuantLinear.random(4096, 4096, group_size=128, device=device).set_backend(backend)
            x = torch.randn(1, 4096, device=device, dtype=torch.float16)
            layer(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = layer(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            same = bool(torch.allclose(y, layer(x), rtol=1e-3, atol=1e-3))
            out.append({"backend": backend, "status": "ok" if same else "FAIL"})
        except Exception as exc:
            out.append({"backend": backend, "status": "FAIL", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
    return out


def triton_sweep(device, deadline) -> list[dict]:
    """Batch-1/16 timings of a few launch configs on 7B shapes, to check/retune the fixed table."""
    import math

    from qwen_quant.kernels import bench, triton_backend

    out = []
    for k, n in ((4096, 11008), (11008, 4096), (4096, 4096)):
        copies = max(2, math.ceil(bench.COLD_BYTES / bench.weight_bytes("triton", k, n)))
        call = bench.MAKERS["triton"](k, n, device, copies)
        for rows in (1, 16):
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            for block_n in (64, 128, 256):
                for split in (1, 4, 8, 16, 32):
                    if time.perf_counter() > deadline:
                        return out
                    triton_backend.LAUNCH_OVERRIDE.clear()
                    triton_backend.LAUNCH_OVERRIDE.update(BLOCK_N=block_n, split=split)
                    try:
                        us = 1e6 * bench.time_calls(lambda i: call(x, i), copies, device)[0]
                        gbs = bench.weight_bytes("triton", k, n) / us / 1e3
                        out.append({"K": k, "N": n, "rows": rows, "BLOCK_N": block_n, "split": split, "us": us, "gbs": gbs})
                    except Exception as exc:
                        out.append({"K": k, "N": n, "rows": rows, "BLOCK_N": block_n, "split": split,
                                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            triton_backend.LAUNCH_OVERRIDE.clear()
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            us = 1e6 * bench.time_calls(lambda i: call(x, i), copies, device)[0]
            out.append({"K": k, "N": n, "rows": rows, "config": "table", "us": us,
                        **triton_backend.launch_config(rows, k, n, 4, triton_backend.device_sms(device))})
    triton_backend.LAUNCH_OVERRIDE.clear()
    return out


def main() -> int:
    started = time.perf_counter()
    deadline = started + ARGS.budget
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    backends = ["torch"] + [b for b in ("triton", "cuda") if backend_available(b)[0]]
    report = {"device": str(device), "dry_run": ARGS.dry_run, "budget_s": ARGS.budget,
              "available": {b: list(backend_available(b)) for b in ("torch", "triton", "cuda")}}
    cases, rows = (DRY_CASES, DRY_ROWS) if ARGS.dry_run else (GPU_CASES, GPU_ROWS)
    report["correctness"] = check_correctness(device, cases, rows, backends, started + 0.45 * ARGS.budget)
    report["correctness_s"] = time.perf_counter() - started
    if device.type == "cuda":
        report["graph_capture"] = check_graph_capture(device, [b for b in backends if b != "torch"])
        if "triton" in backends:
            try:
                report["triton_sweep"] = triton_sweep(device, time.perf_counter() + 0.15 * ARGS.budget)
            except Exception:
                report["triton_sweep_error"] = traceback.format_exc(limit=3)
    from qwen_quant.kernels.bench import run_benchmark, write_outputs

    left = deadline - time.perf_counter() - 10  # leave time to write the files
    try:
        if ARGS.dry_run:
            bench = run_benchmark("cpu", models=["cpu-small"], batches=[1], impls=["bf16", "tinygemm", "torch"],
                                  time_budget_s=max(left, 1), argv=sys.argv, quiet=True)
        else:
            bench = run_benchmark("cuda", time_budget_s=max(left, 1), argv=sys.argv, quiet=True)
        report["bench_files"] = {k: str(v) for k, v in write_outputs(bench, ARGS.out_dir).items()}
        report["bench_cells"] = {s: sum(c["status"] == s for c in bench["cells"]) for s in ("ok", "skipped", "error", "unsupported")}
    except Exception:
        report["bench_error"] = traceback.format_exc(limit=3)
    failures = [r for r in report["correctness"] + report.get("graph_capture", []) if r["status"] == "FAIL"]
    report["passed"] = not failures
    report["seconds"] = time.perf_counter() - started
    ARGS.out_dir.mkdir(parents=True, exist_ok=True)
    (ARGS.out_dir / "gpu_kernels.json").write_text(json.dumps(report, indent=1))
    print(f"correctness: {len(report['correctness']) - len(failures)} ok/skipped, {len(failures)} FAIL; "
          f"bench cells {report.get('bench_cells')}; {report['seconds']:.0f} s -> {ARGS.out_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
