"""`qwen-bench-kernels --check`: are the Int4 kernels right on this machine? Run on every new GPU before a number
from it is trusted.

1. Every backend (torch, cpu on a CPU, triton, cuda where available) through QuantLinear against a float64
   dequantize-then-matmul reference: act-order, partial last groups, groups 32/64/128/-1, bits 2/4/8, v1 and
   v2 zero points, bias, batches 1..64, fp16 and bf16; tolerance from the activation dtype's rounding.
2. CUDA-graph capture of the triton and cuda forwards (capture, change the input in place, replay, compare).
3. The CUDA C++ library itself: built for this GPU, every kernel variant on odd shapes against float64 with
   the output poisoned with NaN first (on a machine without a GPU: built for sm_80/sm_90a, and the
   variants' CPU emulations checked instead).
Writes OUT/kernel_check.json (with provenance); exit code 1 when anything fails. A time budget keeps the run
short: checks that do not fit are recorded as skipped, never as passed.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from qwen_quant.kernels import format as fmt
from qwen_quant.kernels.quant_linear import QuantLinear

EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# (K, N, bits, group_size, act_order, bias, format)
GPU_CASES = [
    (4096, 4096, 4, 128, False, False, "gptq"), (4096, 11008, 4, 128, True, True, "gptq"),
    (11008, 4096, 4, 128, False, False, "gptq_v2"), (3584, 512, 4, 128, True, True, "gptq"),
    (576, 1536, 4, 128, False, True, "gptq"), (1536, 576, 4, 64, True, False, "gptq_v2"),
    (1000, 264, 4, 32, True, True, "gptq"), (2048, 1024, 4, -1, False, False, "gptq"),
    (2048, 1024, 2, 128, True, False, "gptq"), (1024, 520, 8, 64, False, True, "gptq_v2"),
]
CPU_CASES = [(576, 72, 4, 128, False, True, "gptq"), (256, 40, 4, 32, True, False, "gptq_v2"),
             (200, 48, 4, -1, False, False, "gptq"), (1024, 64, 4, 512, True, True, "gptq")]
GPU_ROWS, CPU_ROWS = (1, 2, 3, 8, 16, 17, 33, 64), (1, 17)
CPU_BACKEND_ROWS = (65, 130)  # the cpu backend also past its kernel/dequantize switch (KERNEL_MAX_ROWS = 64)
# the CUDA library's own sweep: K, N, group, act_order
CUDA_SWEEP = [
    (64, 16, 32, False), (128, 40, 32, True), (192, 24, 64, True), (576, 72, 128, False),
    (256, 8, -1, False), (576, 24, -1, True), (192, 40, 48, True), (512, 200, 128, True),
    (1024, 1000, 128, False), (4096, 344, 128, True), (11008, 64, 128, True),
]
CUDA_ROWS, CUDA_CPU_ROWS = (1, 2, 3, 4, 7, 8, 9, 15, 16), (1, 9, 16)


def random_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, bias: bool, fmt_name: str,
                 gen: torch.Generator) -> QuantLinear:
    """A QuantLinear with random codes, zeros, scales (and a shuffled g_idx for act-order) in `fmt_name`."""
    groups = fmt.num_groups(k, group_size)
    codes = torch.randint(0, 2 ** bits, (k, n), generator=gen)
    zeros = torch.randint(0 if fmt_name == "gptq_v2" else 1, 2 ** bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    g_idx = fmt.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_quant(codes, scales, zeros, g_idx, b, bits, group_size, checkpoint_format=fmt_name)


def reference(layer: QuantLinear, x: torch.Tensor, w64: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The float64 output and the tolerance a correct kernel in x's dtype meets: rounding of the output and of
    the dequantized weight to the activation dtype before the dot products."""
    y = x.double() @ w64.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    eps = EPS[x.dtype]
    spread = (x.double().pow(2) @ w64.pow(2).T).sqrt().max().item()
    return y, 2 * eps * y.abs().max().item() + 4 * eps * spread


def check_layers(device: torch.device, cases, rows_list, backends, deadline: float) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        layer = random_layer(*case, gen).to(device)
        w64 = fmt.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.in_features,
                             v1=layer.checkpoint_format == "gptq", dtype=torch.float64).to(device)
        for backend in backends:
            entry = {"case": list(case), "backend": backend}
            if time.perf_counter() > deadline:
                results.append({**entry, "status": "skipped"})
                continue
            try:
                layer.set_backend(backend)
            except Exception as exc:  # a shape a forced backend does not take: recorded, not a failure
                results.append({**entry, "status": "unsupported", "error": str(exc).splitlines()[0]})
                continue
            worst, ok, error = 0.0, True, None
            try:
                for dtype in (torch.float16, torch.bfloat16):
                    for rows in (*rows_list, *(CPU_BACKEND_ROWS if backend == "cpu" else ())):
                        x = torch.randn(rows, case[0], device=device).to(dtype)
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


def check_graph_capture(device: torch.device, backends) -> list[dict]:
    """Capture one forward in a CUDA graph, change the input in place, replay, compare with eager."""
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


def check_cuda_library(on_gpu: bool, deadline: float) -> dict:
    """Build the CUDA C++ library, then every variant x shape x batch x dtype against float64 (on a GPU the
    kernels, output poisoned with NaN first; elsewhere the variants' CPU emulations)."""
    from qwen_quant.kernels import cuda_backend as cb

    archs = (cb.arch_for_capability(*torch.cuda.get_device_capability()),) if on_gpu else cb.CI_ARCHS
    t0 = time.perf_counter()
    built = cb.build_library(archs=archs, force=True)
    spills = [ln.strip() for ln in built.log.splitlines() if "spill stores" in ln and "0 bytes spill" not in ln]
    report = {"archs": list(archs), "build_s": round(time.perf_counter() - t0, 2), "spilling_kernels": spills}
    device = torch.device("cuda" if on_gpu else "cpu")
    runtime = cb._get_runtime() if on_gpu else None
    variants = runtime.good if on_gpu else cb.VARIANTS
    checked, failures, worst, skipped = 0, [], {}, 0
    for ci, (k, n, group, act) in enumerate(CUDA_SWEEP if on_gpu else CUDA_SWEEP[:5]):
        layer = cb.random_layer(k, n, group, act, seed=ci)
        tensors = [layer[key].to(device) for key in ("qweight", "qzeros", "scales", "g_idx")]
        truth = (layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
        for variant in variants:
            if time.perf_counter() > deadline:
                skipped += 1
                continue
            state = cb.relayout(*tensors, group_size=group, v1=True, variant=variant)
            for rows in (CUDA_ROWS if on_gpu else CUDA_CPU_ROWS):
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + ci)).to(dtype)
                    ref, abs_ref = cb.reference_matmul(x, *truth), cb.reference_matmul(x, *truth, absolute=True)
                    if on_gpu:
                        out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)  # poisoned
                        cb._launch(runtime.library, variant, x.to(device), state, out)
                        got, tol = out.double().cpu(), cb.output_tolerance(ref, abs_ref, dtype)
                    else:
                        got, tol = cb.emulate(x, state, variant), 1e-9 * ref.abs() + 1e-12
                    ratio = float(((got - ref).abs().nan_to_num(float("inf")) / tol).max())
                    worst[variant] = max(worst.get(variant, 0.0), ratio)
                    checked += 1
                    if not ratio <= 1.0:
                        failures.append(dict(variant=variant, K=k, N=n, group=group, act_order=act, M=rows,
                                             dtype=str(dtype), err_over_tol=ratio))
    return report | {"mode": "gpu kernels" if on_gpu else "cpu emulation", "checked": checked,
                     "skipped_variants": skipped, "failures": failures[:20], "n_failures": len(failures),
                     "worst_err_over_tol": worst}


def run_check(device: str, out_dir: Path, budget_s: float = 120.0, argv=None) -> dict:
    """All three checks within budget_s; writes out_dir/kernel_check.json and returns the report."""
    from qwen_quant.files import write_text_atomic
    from qwen_quant.kernels.backends import backend_available
    from qwen_quant.provenance import collect_env

    started = time.perf_counter()
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    here = ("triton", "cuda") if on_gpu else ("cpu", "triton")
    backends = ["torch"] + [b for b in here if backend_available(b)[0]]
    report = {"provenance": collect_env(list(argv or [])), "device": str(dev), "budget_s": budget_s,
              "available": {b: list(backend_available(b)) for b in ("torch", "cpu", "triton", "cuda")}}
    cases, rows = (GPU_CASES, GPU_ROWS) if on_gpu else (CPU_CASES, CPU_ROWS)

    def step(name, fn, *args):
        t0 = time.perf_counter()
        try:
            report[name] = fn(*args)
        except Exception:  # one broken check must not hide the others
            report[name] = {"error": traceback.format_exc(limit=3)}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)

    step("layers", check_layers, dev, cases, rows, backends, started + 0.6 * budget_s)
    if on_gpu:
        step("graph_capture", check_graph_capture, dev, [b for b in backends if b != "torch"])
    step("cuda_library", check_cuda_library, on_gpu and "cuda" in backends, started + budget_s)
    failed = [r for r in report["layers"] if isinstance(report["layers"], list) and r["status"] == "FAIL"]
    failed += [r for r in report.get("graph_capture", []) if r["status"] == "FAIL"]
    lib = report["cuda_library"]
    report["passed"] = not failed and "error" not in lib and lib.get("n_failures", 1) == 0 \
        and isinstance(report["layers"], list)
    report["failures"] = failed
    out_dir.mkdir(parents=True, exist_ok=True)
    import json

    write_text_atomic(out_dir / "kernel_check.json", json.dumps(report, indent=1, default=str))
    return report
