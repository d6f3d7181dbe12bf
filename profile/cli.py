"""qwen-profile: tokens/s and peak memory per (model, precision, engine, scenario), in the seed's tables.

Parses arguments, checks them all before any cell starts, and calls the library:
plan_cells -> run_profile (one subprocess per cell) -> render_tables / render_plots.
"""

from __future__ import annotations

import os

import argparse
import datetime as dt
import sys
from pathlib import Path

from qwen_quant.cli_util import Parser, is_quiet, run_cli
from qwen_quant.errors import UserError

GPU_DEFAULT_MODEL = "synthetic:qwen-7b"
CPU_DEFAULT_MODEL = "demo"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwen-profile",
        description="Speed (tokens/s) and peak memory of Qwen models in BF16/FP16/Int4, each cell in a fresh "
                    "process, written as results.json + the seed's speed and memory tables + plots.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="HF id, local dir, quantized checkpoint dir, 'demo' or 'synthetic:<shape>' "
                        "(default: synthetic:qwen-7b on a GPU, the demo model on the CPU)")
    p.add_argument("--encode", default="2048", help="context lengths of the encode scenario (1 new token), "
                                                    "comma-separated, or 'none' (default 2048)")
    p.add_argument("--gen", default="2048,8192", help="new-token counts of the generate scenario (1-token "
                                                      "context), comma-separated, or 'none' (default 2048,8192)")
    p.add_argument("--precision", default=None,
                   help="bf16,fp16,fp32,int4 (default: bf16 and int4 where the model has both; int4 only "
                        "for a quantized checkpoint)")
    p.add_argument("--engine", default="hf", help="hf (transformers generate) or fast; comma-separated for both")
    p.add_argument("--backend", default="auto", help="Int4 kernel backend: auto, torch, cpu, triton, cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="short warm-up runs of the same shapes per cell")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per cell (median and min/max reported)")
    p.add_argument("--gen-repeat", type=int, default=None,
                   help="timed runs per generate cell (default: --repeat); 1 saves minutes at 8192 tokens")
    p.add_argument("--out", default=None, help="output folder (default reports/profile/<model>-<date>)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kv-cache", default="auto", help="KV cache of the fast engine: auto, bf16, fp16, int8")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="cap each cell's memory (GPU allocator fraction; CPU address space): a cell that "
                        "needs more is recorded as OOM")
    p.add_argument("--cell-timeout", type=float, default=None, help="seconds before a cell is stopped (error)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (default: torch's default; 1 is steadier on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-cell lines")
    return p


def detect_device(requested: str) -> str:
    """cuda when torch has CUDA and NVML sees a GPU (checked without creating a CUDA context)."""
    from qwen_quant.provenance import nvml_gpus, torch_cuda_version

    has_gpu = bool(torch_cuda_version()) and bool(nvml_gpus())
    if requested == "cuda" and not has_gpu:
        raise UserError("--device cuda: no CUDA GPU visible to this torch build; use --device cpu")
    if requested == "auto":
        return "cuda" if has_gpu else "cpu"
    return requested


def _check_counts(args) -> None:
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.repeat < 1:
        raise UserError(f"--repeat must be at least 1, got {args.repeat}")
    if args.gen_repeat is not None and args.gen_repeat < 1:
        raise UserError(f"--gen-repeat must be at least 1, got {args.gen_repeat}")
    if args.max_memory_gib is not None and args.max_memory_gib <= 0:
        raise UserError("--max-memory-gib must be a positive number of GiB")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        raise UserError("--cell-timeout must be a positive number of seconds")


def estimate_cpu_minutes(cells, warmup: int, repeat: int, gen_repeat: int | None = None) -> float:
    """A rough duration for the demo model on a 2-core CPU (HF generate, bf16): ~8 s to start a cell,
    ~35 ms per decoded token growing with the cache, ~1 ms per prompt token."""
    seconds = 0.0
    for c in cells:
        decode = c.new_tokens * (0.035 + 0.4e-5 * (c.context_tokens + c.new_tokens / 2))
        prefill = c.context_tokens * 1.0e-3
        runs = (gen_repeat or repeat) if c.scenario == "generate" else repeat
        warm = warmup * (1.0 if c.scenario == "encode" else 16 / max(16, c.new_tokens))
        seconds += 8 + (runs + warm) * (decode + prefill)
    return seconds / 60


def main_impl(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # cheap checks first (no torch import), so a typo fails in a fraction of a second
    from qwen_quant.profile.cells import parse_lengths, parse_precisions, plan_cells
    from qwen_quant.engine import parse_engines

    encode = parse_lengths(args.encode, "--encode")
    gens = parse_lengths(args.gen, "--gen")
    if not encode and not gens:
        raise UserError("nothing to measure: --encode and --gen are both 'none'")
    precisions = parse_precisions(args.precision)
    engines = parse_engines(args.engine)
    _check_counts(args)
    from qwen_quant.profile.models import check_precision, default_precisions, resolve_model

    device = detect_device(args.device)
    quiet = args.quiet or is_quiet()

    models = args.models or [GPU_DEFAULT_MODEL if device == "cuda" else CPU_DEFAULT_MODEL]
    # cells run with their job folder as cwd: local model paths must be absolute there
    models = [os.path.abspath(m) if os.path.exists(m) else m for m in models]
    infos = [resolve_model(m) for m in models]
    planned = []
    for info in infos:
        chosen = precisions or default_precisions(info)
        for p in chosen:
            check_precision(info, p)
        planned.append((info.model, info.label, chosen))
    cells = plan_cells(planned, encode, gens, engines, args.backend, args.batch)

    if not args.models and device == "cpu":
        minutes = estimate_cpu_minutes(cells, args.warmup, args.repeat, args.gen_repeat)
        print(f"No MODEL given and no GPU: profiling the demo model on the CPU ({len(cells)} cells, "
              f"expected about {minutes:.0f} min on 2 cores; shorten with --gen 256 --encode 256 --repeat 1).",
              file=sys.stderr, flush=True)

    out = Path(args.out) if args.out else Path("reports/profile") / (
        "+".join(i.label for i in infos) + "-" + dt.date.today().isoformat())
    return run_and_report(cells, out, device, args, quiet, ["qwen-profile"] + argv)


def run_and_report(cells, out: Path, device: str, args, quiet: bool, command: list[str]) -> int:
    from qwen_quant.provenance import collect_env
    from qwen_quant.profile.plots import render_plots
    from qwen_quant.profile.runner import RunOptions, run_profile
    from qwen_quant.profile.tables import format_summary, render_tables

    options = RunOptions(device=device, warmup=args.warmup, repeat=args.repeat, gen_repeat=args.gen_repeat,
                         max_memory_gib=args.max_memory_gib,
                         kv_cache=args.kv_cache, cell_timeout_s=args.cell_timeout, quiet=quiet,
                         threads=args.threads)
    env = collect_env(command)
    try:
        run_profile(cells, out, options, env)
    finally:  # also after Ctrl-C: the tables show what finished
        results_path = out / "results.json"
        if results_path.is_file():
            written = render_tables(results_path) + render_plots(results_path, out)
            print(format_summary(results_path))
            print(f"results: {results_path}\n" + "\n".join(f"  {p}" for p in written))
    return 0


main = run_cli(main_impl)
