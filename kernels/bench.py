"""Kernel benchmark (qwen-bench-kernels): our Int4 backends vs BF16 torch.matmul (cuBLAS) vs torch's
int4 tinygemm, at the linear shapes of Qwen-7B, Qwen-14B, Qwen2.5-7B and Qwen3-8B (METHOD.md).

Per cell (shape, batch, implementation): µs, TFLOP/s, achieved GB/s, % of the copy-bandwidth
roofline (bytes that must move: weights as stored + activations in and out), speed-up over BF16.
Weights are L2-cold: each implementation rotates through copies totalling > 2x L2 (>= 120 MB).
On a GPU, timing replays a CUDA graph of the rotated calls (pure device time, and proof that the
forward is capturable); on the CPU (labelled, few shapes) it is wall clock.
Writes reports/kernels/<gpu-or-cpu>-<date>.{json,md,png}; md and png are rendered from the JSON.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qwen_quant.cli_util import Parser, is_quiet, run_cli
from qwen_quant.errors import UserError
from qwen_quant.files import write_text_atomic
from qwen_quant.kernels.bandwidth import copy_bandwidth_gbs

# (model, layer, K, N): the distinct linear shapes of each model (Qwen2-style k/v share one shape)
MODEL_SHAPES = {
    "qwen-7b": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096)],
    "qwen-14b": [("qkv", 5120, 15360), ("o", 5120, 5120), ("gate/up", 5120, 13696), ("down", 13696, 5120)],
    "qwen2.5-7b": [("q", 3584, 3584), ("k/v", 3584, 512), ("o", 3584, 3584), ("gate/up", 3584, 18944),
                   ("down", 18944, 3584)],
    "qwen3-8b": [("q", 4096, 4096), ("k/v", 4096, 1024), ("o", 4096, 4096), ("gate/up", 4096, 12288),
                 ("down", 12288, 4096)],
}
CPU_SHAPES = {"cpu-small": [("mlp", 1024, 2816), ("o", 1024, 1024)],
              # Qwen2.5(-Coder)-1.5B: the real model the CPU work runs (k/v 1536x256, gate/up, down)
              "qwen2.5-1.5b": [("q/o", 1536, 1536), ("k/v", 1536, 256), ("gate/up", 1536, 8960), ("down", 8960, 1536)]}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CPU_BATCHES = (1, 16, 64, 256)  # decode, and both sides of the CPU backend's kernel/dequantize switch
IMPLS = ("bf16", "tinygemm", "torch", "cpu", "triton", "cuda")
GROUP_SIZE = 128
COLD_BYTES = 120 * 2**20  # > 2x the 50-60 MB L2 of H100/H200


# ---- implementations: each builds `copies` weights and returns call(x, i) -----------------------
def weight_bytes(impl: str, k: int, n: int) -> int:
    """Bytes one weight copy occupies (what a memory-bound call must read)."""
    if impl == "bf16":
        return 2 * k * n
    groups = math.ceil(k / GROUP_SIZE)
    if impl == "tinygemm":
        return k * n // 2 + groups * n * 4  # bf16 scale and zero per group
    if impl == "cpu":
        return k * n // 2 + groups * n * 7  # + its dequantize's checkpoint-precision scale and 8-bit zero
    return k * n // 2 + groups * n * 2 + groups * n // 2  # packed codes, fp16 scales, 4-bit zeros


def _bf16_impl(k, n, device, copies):
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    return lambda x, i: torch.nn.functional.linear(x, weights[i])


def _tinygemm_impl(k, n, device, copies):
    if k % GROUP_SIZE:
        raise UserError(f"tinygemm needs K % {GROUP_SIZE} == 0")
    groups = k // GROUP_SIZE
    packed = []
    for _ in range(copies):
        if device.type == "cuda":
            raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
            packed.append(torch.ops.aten._convert_weight_to_int4pack(raw, 8))
        else:
            raw = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(raw, 2))
    scale_zero = torch.rand(groups, n, 2, device=device, dtype=torch.bfloat16) * 0.01
    mm = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
    return lambda x, i: mm(x, packed[i], GROUP_SIZE, scale_zero)


def _ours_impl(backend):
    def make(k, n, device, copies):
        from qwen_quant.kernels.quant_linear import QuantLinear

        layers = [QuantLinear.random(k, n, bits=4, group_size=GROUP_SIZE, device=device).set_backend(backend)
                  for _ in range(copies)]
        return lambda x, i: layers[i](x)
    return make


MAKERS = {"bf16": _bf16_impl, "tinygemm": _tinygemm_impl, "torch": _ours_impl("torch"), "cpu": _ours_impl("cpu"),
          "triton": _ours_impl("triton"), "cuda": _ours_impl("cuda")}


# ---- timing -----------------------------------------------------------------------------------
def measure_copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in GB/s (bytes read + written), the roofline of this run."""
    return copy_bandwidth_gbs(device, None if device.type == "cuda" else 1 << 27)


def time_calls(call, copies: int, device: torch.device, repeats: int = 20) -> tuple[float, bool]:
    """(median seconds per call, whether a CUDA graph was used), rotating through `copies` weights."""
    for i in range(copies):  # warm-up (compiles, autotunes, fills caches of the allocator)
        call(i)
    if device.type != "cuda":
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            call(r % copies)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), False
    torch.cuda.synchronize()
    rounds = max(1, 64 // copies)
    graph = None
    try:  # a graph of rounds*copies calls: pure device time, no launch overhead
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call(0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for i in range(copies):
                    call(i)
        run = graph.replay
    except Exception:
        graph = None
        def run():
            for _ in range(rounds):
                for i in range(copies):
                    call(i)
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, repeats // 4)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rounds * copies))
    return statistics.median(times), graph is not None


def bench_cell(impl: str, k: int, n: int, batch: int, device: torch.device, bandwidth_gbs: float) -> dict:
    cell = {"impl": impl, "K": k, "N": n, "batch": batch}
    per_copy = weight_bytes(impl, k, n)
    try:
        copies = max(2, math.ceil(COLD_BYTES / per_copy)) if device.type == "cuda" else 1
        call_fn = MAKERS[impl](k, n, device, copies)
        x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
        seconds, used_graph = time_calls(lambda i: call_fn(x, i), copies, device)
    except UserError as exc:
        return {**cell, "status": "unsupported", "error": str(exc).splitlines()[0]}
    except Exception as exc:
        return {**cell, "status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    moved = per_copy + 2 * batch * (k + n)
    gbs = moved / seconds / 1e9
    return {**cell, "status": "ok", "us": seconds * 1e6, "tflops": 2 * batch * k * n / seconds / 1e12,
            "gbs": gbs, "roofline_pct": 100 * gbs / bandwidth_gbs, "bytes": moved, "copies": copies,
            "cuda_graph": used_graph}


# ---- provenance and output --------------------------------------------------------------------
def provenance(device: torch.device, argv) -> dict:
    """The shared record (provenance.collect_env) plus what a kernel number depends on: SMs and L2 size."""
    from qwen_quant.provenance import collect_env

    info = collect_env(list(argv)) | {"device": str(device), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return info


def _label(prov: dict) -> str:
    name = prov.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def speedups(cells: list[dict]) -> None:
    """Add speedup_vs_bf16 to every ok cell that has a BF16 twin."""
    base = {(c["K"], c["N"], c["batch"]): c["us"] for c in cells if c["impl"] == "bf16" and c["status"] == "ok"}
    for c in cells:
        if c["status"] == "ok" and (c["K"], c["N"], c["batch"]) in base:
            c["speedup_vs_bf16"] = base[(c["K"], c["N"], c["batch"])] / c["us"]


def render_markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [f"# Int4 kernel benchmark — {prov.get('gpu') or 'CPU (labelled: not a GPU result)'}", "",
             f"Date {prov['date']}, torch {prov['torch']}, triton {prov.get('triton')}, CUDA {prov.get('cuda')}, "
             f"driver {prov.get('driver')}, commit {prov.get('commit')}.  ",
             f"Command: `{prov['command']}`  ",
             f"Measured copy bandwidth: **{result['bandwidth_gbs']:.0f} GB/s** (the roofline). "
             f"Weights L2-cold (rotated copies >= {COLD_BYTES >> 20} MB on GPU). Int4: bits 4, group {GROUP_SIZE}, "
             f"activations bf16.", "",
             "Each cell: µs (speed-up over BF16, % of roofline). `—` = not run, `n/a` = unsupported.", ""]
    impls = [i for i in IMPLS if any(c["impl"] == i for c in result["cells"])]
    for model, layers in result["shapes"].items():
        for layer, k, n in layers:
            lines += [f"## {model} {layer}: K={k}, N={n}", "", "| batch | " + " | ".join(impls) + " |",
                      "|---|" + "---|" * len(impls)]
            for batch in result["batches"]:
                row = []
                for impl in impls:
                    c = next((c for c in result["cells"] if (c["impl"], c["K"], c["N"], c["batch"]) == (impl, k, n, batch)), None)
                    row.append(_fmt_cell(c))
                lines.append(f"| {batch} | " + " | ".join(row) + " |")
            lines.append("")
    flagged = [c for c in result["cells"] if c.get("roofline_pct", 0) > 100]
    if flagged:
        lines.append(f"**Warning:** {len(flagged)} cells exceed 100 % of the roofline: measurement error (L2 hits?).")
    return "\n".join(lines) + "\n"


def _fmt_cell(c) -> str:
    if c is None:
        return "—"
    if c["status"] != "ok":
        return {"unsupported": "n/a", "skipped": "not run"}.get(c["status"], "error")
    sp = f"{c['speedup_vs_bf16']:.2f}x, " if "speedup_vs_bf16" in c else ""
    flag = " ⚠" if c["roofline_pct"] > 100 else ""
    return f"{c['us']:.1f} ({sp}{c['roofline_pct']:.0f}%{flag})"


def render_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["shapes"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        shapes = {(k, n) for _, k, n in result["shapes"][model]}
        for impl in IMPLS:
            if impl == "bf16":
                continue
            xs, ys = [], []
            for batch in result["batches"]:
                vals = [c["speedup_vs_bf16"] for c in result["cells"] if c["impl"] == impl and c["batch"] == batch
                        and (c["K"], c["N"]) in shapes and "speedup_vs_bf16" in c]
                if vals:
                    xs.append(batch)
                    ys.append(math.exp(sum(map(math.log, vals)) / len(vals)))
            if xs:
                ax.plot(xs, ys, marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel("speed-up over BF16 (geo-mean of layers)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Int4 kernels — {result['provenance'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_label(result['provenance'])}-{result['provenance']['date'][:10]}"
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    write_text_atomic(paths["json"], json.dumps(result, indent=1))
    write_text_atomic(paths["md"], render_markdown(result))
    render_plot(result, paths["png"])
    return paths


# ---- the run ----------------------------------------------------------------------------------
def run_benchmark(device="cuda", models=None, batches=None, impls=None, time_budget_s: float | None = None,
                  argv=None, quiet: bool = False) -> dict:
    """Benchmark every (shape, batch, impl) cell in one process; returns the JSON-able result."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; use --device cpu (a labelled CPU run)")
    table = MODEL_SHAPES if on_gpu else CPU_SHAPES
    if models:
        unknown = [m for m in models if m not in {**MODEL_SHAPES, **CPU_SHAPES}]
        if unknown:
            raise UserError(f"unknown model {unknown[0]!r}; choose from {', '.join([*MODEL_SHAPES, *CPU_SHAPES])}")
        table = {m: {**MODEL_SHAPES, **CPU_SHAPES}[m] for m in models}
    batches = tuple(batches or (BATCHES if on_gpu else CPU_BATCHES))
    impls = [i for i in (impls or IMPLS) if i in IMPLS]
    if not on_gpu:  # the interpreter and a GPU-only kernel are not benchmarks on a CPU
        impls = [i for i in impls if i not in ("triton", "cuda")]
    else:
        impls = [i for i in impls if i != "cpu"]
    impls = [i for i in impls if i in ("bf16", "tinygemm") or _backend_ok(i)]
    bandwidth = measure_copy_bandwidth(device)
    result = {"provenance": provenance(device, argv or sys.argv), "bandwidth_gbs": bandwidth,
              "shapes": {m: [list(s) for s in layers] for m, layers in table.items()},
              "batches": list(batches), "impls": impls, "group_size": GROUP_SIZE, "cells": []}
    shapes = sorted({(k, n) for layers in table.values() for _, k, n in layers})
    # small batches first: with a time budget, the decode cells (the point of Int4) are never the ones skipped
    todo = [(impl, k, n, b) for b in sorted(batches) for k, n in shapes for impl in impls]
    started = time.perf_counter()
    from tqdm import tqdm

    for impl, k, n, b in tqdm(todo, desc="kernel cells", disable=quiet or is_quiet()):
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            result["cells"].append({"impl": impl, "K": k, "N": n, "batch": b, "status": "skipped",
                                    "error": "time budget spent"})
            continue
        result["cells"].append(bench_cell(impl, k, n, b, device, bandwidth))
        if on_gpu:
            torch.cuda.empty_cache()
    speedups(result["cells"])
    result["seconds"] = time.perf_counter() - started
    return result


def _backend_ok(name: str) -> bool:
    from qwen_quant.kernels.backends import backend_available

    return backend_available(name)[0]


def _parse(argv):
    p = Parser(prog="qwen-bench-kernels", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="*", help=f"subset of {', '.join([*MODEL_SHAPES, *CPU_SHAPES])}")
    p.add_argument("--batches", nargs="*", type=int, help="batch sizes (rows); default 1..128 on GPU, 1 16 on CPU")
    p.add_argument("--impls", nargs="*", choices=IMPLS, help="implementations to time (default all available)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; cells after it are recorded as skipped")
    p.add_argument("--out-dir", default="reports/kernels", help="where <gpu>-<date>.{json,md,png} go")
    p.add_argument("--check", action="store_true",
                   help="check the kernels instead of timing them: every backend against a float64 reference on "
                        "odd shapes, CUDA-graph capture, the CUDA library's variants (kernels/check.py); writes "
                        "OUT_DIR/kernel_check.json, exit 1 on a failure (--time-budget: default 120 s)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


@run_cli
def main(argv=None):
    args = _parse(argv)
    command = ["qwen-bench-kernels", *(argv if argv is not None else sys.argv[1:])]
    if args.check:
        from qwen_quant.kernels.check import run_check

        report = run_check(args.device, Path(args.out_dir), args.time_budget or 120.0, command)
        layers = report["layers"] if isinstance(report["layers"], list) else []
        lib = report["cuda_library"]
        print(f"kernel check on {report['device']}: layers {sum(r['status'] == 'ok' for r in layers)} ok, "
              f"{sum(r['status'] == 'FAIL' for r in layers)} FAIL, {sum(r['status'] == 'skipped' for r in layers)} "
              f"skipped; CUDA library ({lib.get('mode', 'error')}) {lib.get('checked', 0)} checked, "
              f"{lib.get('n_failures', 'error')} failures -> {Path(args.out_dir) / 'kernel_check.json'}")
        return 0 if report["passed"] else 1
    if args.batches is not None and any(b <= 0 for b in args.batches):
        raise UserError("--batches must be positive integers")
    result = run_benchmark(args.device, args.models, args.batches, args.impls, args.time_budget, argv=command,
                           quiet=args.quiet)
    paths = write_outputs(result, Path(args.out_dir))
    if not args.quiet:
        print(f"wrote {paths['md']} ({paths['json'].name}, {paths['png'].name})")
    return 0


if __name__ == "__main__":
    main()
