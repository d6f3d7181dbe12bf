#!/usr/bin/env python
"""GPU step of the fast engine (issue 7): one run, about 100 s on an H100.

synthetic:qwen-7b (random weights at Qwen-7B's shape) in Int4 (random GPTQ codes made directly on
the GPU, no 16-bit copy) and in BF16, through the fast engine: decode tok/s at context 1 and 2048,
generate-2048 and generate-8192 average tok/s (Int4), peak memory per cell (allocator stats reset
per cell), the device-to-device copy bandwidth measured in the same run and % of roofline, beside
transformers generate in BF16 at 256 tokens (for the ">= 8x HF" ratio).

Writes OUT/results.json in qwen-profile's results.json layout (env, bandwidth, cells with
CELL_FIELDS, details) plus a "goals" block, and prints one line per cell. Cells run in this one
process (one model build per precision keeps the run short); each cell builds its own engine and
KV cache sized to context + new tokens, and empties the allocator cache before it starts.

    python scripts/gpu_fast_engine.py OUT              # on the GPU machine
    python scripts/gpu_fast_engine.py OUT --dry-run    # on the CPU: synthetic:tiny, tiny lengths
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Full run: (label, context, new tokens). Decode cells use a short generation after the context.
FULL = dict(shape="qwen-7b", decode=[(1, 256), (2048, 128)], generate=[2048, 8192], hf=256)
DRY = dict(shape="tiny", decode=[(1, 8), (24, 4)], generate=[12, 20], hf=6)
GOALS = {"int4_decode_tok_s": 400, "bf16_decode_tok_s": 150, "int4_generate_8192_tok_s": 300,
         "int4_over_hf_bf16": 8.0, "int4_generate_8192_peak_allocated_gib": 10.0}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for results.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, synthetic:tiny, tiny lengths (proves the script runs)")
    p.add_argument("--backend", default="auto", help="Int4 kernel backend (auto|cuda|triton|torch)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new cell after this much wall time; the rest are recorded as skipped "
                        "(default 100 on the GPU, 1200 for the dry run)")
    p.add_argument("--no-fuse", action="store_true", help="eager element-wise ops in the decode step (A/B)")
    p.add_argument("--no-bf16", action="store_true", help="skip the BF16 model (fast and HF)")
    p.add_argument("--no-8192", action="store_true", help="skip generate-8192")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from qwen_quant.provenance import collect_env
    from qwen_quant.profile.roofline import measure_copy_bandwidth

    torch.set_grad_enabled(False)
    if args.dry_run:
        torch.set_num_threads(1)  # a busy 2-core box: OpenMP spinning makes 2 threads far slower
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.dry_run else 100.0
    plan = DRY if args.dry_run else FULL
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"env": collect_env(sys.argv if argv is None else ["gpu_fast_engine.py", *argv]),
               "bandwidth": measure_copy_bandwidth(device), "cells": [], "details": [],
               "script": "scripts/gpu_fast_engine.py", "dry_run": args.dry_run,
               "note": "synthetic random weights at a real shape: speed and memory only"}
    bw = results["bandwidth"]["bandwidth_gbps"]
    print(f"copy bandwidth {bw:.0f} GB/s on {device}", flush=True)

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    def save():
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
        os.replace(tmp, args.out / "results.json")

    spec = f"synthetic:{plan['shape']}"
    cells = [("int4", "fast", c, n) for c, n in plan["decode"]]
    cells += [("int4", "fast", 1, n) for n in plan["generate"] if not (args.no_8192 and n >= 8192)]
    if not args.no_bf16:
        cells += [("bf16", "fast", c, n) for c, n in plan["decode"]]
        cells += [("bf16", "hf", 1, plan["hf"])]
    for precision in ("int4", "bf16"):
        todo = [c for c in cells if c[0] == precision]
        if not todo:
            continue
        model = None
        for _, engine, context, new in todo:
            if over_budget():
                results["cells"].append(skipped_row(plan, precision, engine, args.backend, context, new))
                continue
            if model is None:
                model = build(spec, precision, device, args.backend)
            row, details = measure(model, spec, precision, engine, args.backend, context, new, device, bw,
                                   fuse=False if args.no_fuse else None)
            results["cells"].append(row)
            results["details"].append(details)
            print(one_line(row), flush=True)
            save()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    results["goals"] = check_goals(results["cells"], device)
    results["wall_s"] = time.perf_counter() - t_start
    save()
    print(json.dumps(results["goals"], indent=1))
    print(f"wrote {args.out / 'results.json'} in {results['wall_s']:.1f} s")
    return 0


def build(spec: str, precision: str, device: str, backend: str):
    from qwen_quant.profile.models import build_model, resolve_model

    t0 = time.perf_counter()
    model = build_model(resolve_model(spec), precision, device, backend)
    print(f"built {spec} {precision} in {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def measure(model, spec, precision, engine_name, backend, context, new, device, bw_gbps, fuse=None):
    """One cell: warm-up (same shapes, 16 tokens), one timed run under the memory probe."""
    import gc

    import torch

    from qwen_quant.profile.cells import CELL_FIELDS
    from qwen_quant.engine import make_engine
    from qwen_quant.profile.memory import MemoryProbe
    from qwen_quant.profile.models import model_dtype
    from qwen_quant.profile.roofline import decode_bytes_per_token, decode_weight_bytes, kv_bytes_per_position, roofline

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    ids = torch.randint(100, 10000, (1, context), generator=torch.Generator().manual_seed(0))
    probe = MemoryProbe(device).start()  # the engine's KV cache and graphs count in this cell's peak
    if engine_name == "fast":
        from qwen_quant.engine.fast import FastEngine

        engine = FastEngine(model, context + new, device, kv_cache="auto", fuse=fuse)
    else:
        engine = make_engine(engine_name, model, context + new, device, kv_cache="auto")
    engine.timed_generate(ids, min(new, 16))
    r = engine.timed_generate(ids, new)
    memory = probe.stop()
    describe = engine.describe() if hasattr(engine, "describe") else {"engine": engine_name}
    del engine
    total = r["prefill_s"] + sum(r["token_s"])
    decode = len(r["token_s"]) / sum(r["token_s"]) if r["token_s"] else None
    elem = torch.tensor([], dtype=model_dtype(model)).element_size()
    kv_pos = kv_bytes_per_position(model.config, elem)
    bytes_tok = decode_bytes_per_token(decode_weight_bytes(model), kv_pos, context, new)
    roof = roofline(bytes_tok, decode, bw_gbps)
    row = {k: None for k in CELL_FIELDS}
    row.update(model=spec.replace(":", "-"), precision=precision, engine=engine_name, backend=backend,
               scenario="generate", context_tokens=context, new_tokens=new, tokens_per_s=new / total,
               decode_tokens_per_s=decode, prefill_s=r["prefill_s"], repeats=1,
               spread={"min": new / total, "max": new / total}, status="ok", error=None,
               roofline_pct=roof["roofline_pct"], **{k: v for k, v in memory.items() if k in CELL_FIELDS})
    lat = sorted(r["token_s"])
    details = {"cell": f"{row['model']}-{precision}-{engine_name}-c{context}-n{new}", "engine": describe,
               "backend_used": sorted({str(m.backend) for m in model.modules() if type(m).__name__ == "QuantLinear"}),
               "token_latency_p10_p50_p90_s": [lat[int(q * (len(lat) - 1))] for q in (0.1, 0.5, 0.9)] if lat else None,
               "nvml_scope": memory.get("nvml_scope"), **roof}
    return row, details


def skipped_row(plan, precision, engine, backend, context, new) -> dict:
    from qwen_quant.profile.cells import CELL_FIELDS

    row = {k: None for k in CELL_FIELDS}
    row.update(model=f"synthetic-{plan['shape']}", precision=precision, engine=engine, backend=backend,
               scenario="generate", context_tokens=context, new_tokens=new, status="error",
               error="skipped: the script's time budget was used up (--budget-s)")
    return row


def one_line(row) -> str:
    mem = f", peak {row['peak_allocated_gib']:.2f} GiB" if row.get("peak_allocated_gib") is not None else ""
    roof = f", {row['roofline_pct']:.0f}% of roofline" if row.get("roofline_pct") is not None else ""
    return (f"{row['precision']} {row['engine']} c{row['context_tokens']} n{row['new_tokens']}: "
            f"{row['tokens_per_s']:.1f} tok/s, decode {row['decode_tokens_per_s'] or 0:.1f} tok/s{roof}{mem}")


def check_goals(cells, device) -> dict:
    """The issue's H100 goals against this run (on the CPU dry run they are only shown, never met)."""
    def find(precision, engine, context, new_min):
        for c in cells:
            if (c["status"] == "ok" and c["precision"] == precision and c["engine"] == engine
                    and c["context_tokens"] == context and c["new_tokens"] >= new_min):
                return c
        return None

    out = {"device": device, "goals": GOALS}
    int4_decode = [c["decode_tokens_per_s"] for c in cells if c["status"] == "ok" and c["precision"] == "int4"
                   and c["engine"] == "fast" and c["new_tokens"] <= 256]
    bf16_decode = [c["decode_tokens_per_s"] for c in cells if c["status"] == "ok" and c["precision"] == "bf16"
                   and c["engine"] == "fast"]
    hf = find("bf16", "hf", 1, 1)
    big = max((c for c in cells if c["status"] == "ok" and c["precision"] == "int4" and c["engine"] == "fast"
               and c["context_tokens"] == 1), key=lambda c: c["new_tokens"], default=None)
    got = {
        "int4_decode_tok_s_min": min(int4_decode) if int4_decode else None,
        "bf16_decode_tok_s_min": min(bf16_decode) if bf16_decode else None,
        "int4_longest_generate_new_tokens": big and big["new_tokens"],
        "int4_longest_generate_tok_s": big and big["tokens_per_s"],
        "int4_longest_generate_peak_allocated_gib": big and big["peak_allocated_gib"],
        "hf_bf16_tok_s": hf and hf["tokens_per_s"],
        "int4_decode_over_hf_bf16": (max(int4_decode) / hf["tokens_per_s"]) if (hf and int4_decode) else None,
    }
    out["measured"] = got
    if device == "cuda":
        def ok(value, goal, higher=True):
            return None if value is None else (value >= goal if higher else value <= goal)

        long8k = big is not None and big["new_tokens"] >= 8192
        out["met"] = {
            "int4_decode_tok_s": ok(got["int4_decode_tok_s_min"], GOALS["int4_decode_tok_s"]),
            "bf16_decode_tok_s": ok(got["bf16_decode_tok_s_min"], GOALS["bf16_decode_tok_s"]),
            "int4_generate_8192_tok_s": ok(got["int4_longest_generate_tok_s"], GOALS["int4_generate_8192_tok_s"])
            if long8k else None,
            "int4_over_hf_bf16": ok(got["int4_decode_over_hf_bf16"], GOALS["int4_over_hf_bf16"]),
            "int4_generate_8192_peak_allocated_gib": ok(got["int4_longest_generate_peak_allocated_gib"],
                                                        GOALS["int4_generate_8192_peak_allocated_gib"], higher=False)
            if long8k else None,
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
