#!/usr/bin/env python
"""Time GPTQ of synthetic:qwen-7b on a GPU: a slice of the first blocks, extrapolated to the full depth.

    python scripts/gpu_quantize_timing.py OUT_DIR                  # on the GPU (budget: < 60 s wall)
    python scripts/gpu_quantize_timing.py OUT_DIR --dry-run        # CPU, synthetic:tiny, tiny calibration

Builds only the blocks it times (a config at qwen-7b's dimensions with num_hidden_layers=--blocks),
random weights drawn on the GPU, random calibration token ids (timing does not depend on values), then
runs the real pipeline (capture, true-sequential GPTQ per block, recompute, packing) with the model on
the host and one block on the GPU at a time, as a real run does. Writes OUT_DIR/gpu_quantize_timing.json.
The total for 32 blocks is extrapolated from the mean seconds per block and labelled so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qwen_quant.provenance import git_commit


def build_slice(shape: str, blocks: int, device: str, dtype=torch.bfloat16):
    """The first `blocks` decoder blocks of `shape` (plus embeddings/head), random weights drawn on `device`."""
    from transformers import AutoModelForCausalLM

    from qwen_quant.models.synthetic import synthetic_config

    cfg = synthetic_config(shape)
    cfg.num_hidden_layers = blocks
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[:blocks]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_((torch.randn(p.shape, generator=gen, device=device) * 0.02).to(dtype))
        for mod in model.modules():  # rotary buffers from the config, not garbage from to_empty
            if hasattr(mod, "inv_freq") and hasattr(mod, "rope_init_fn"):
                inv_freq, scaling = mod.rope_init_fn(mod.config, device)
                mod.inv_freq, mod.original_inv_freq, mod.attention_scaling = inv_freq, inv_freq, scaling
    return model.eval()


class _NoState:
    """The pipeline's state interface without disk writes (timing only; resume is not measured)."""

    def first_unfinished(self):
        return 0

    def save_block(self, *a, **k):
        pass


class _Timer:
    """Progress hooks that record seconds per block (after a device sync) and print a line per block."""

    def __init__(self, device):
        self.device, self.blocks = device, []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self, *a):
        self._sync()
        self._t = time.perf_counter()

    def resumed(self, *a):
        pass

    def layer_done(self, name):
        pass

    def block_done(self, i, stats, seconds):
        self._sync()
        now = time.perf_counter()
        mean = sum(s.rel_error for s in stats) / len(stats)
        self.blocks.append({"block": i, "seconds": now - self._t, "mean_rel_error": mean,
                            "layers": [s.to_dict() for s in stats]})
        print(f"block {i}: {now - self._t:.2f} s, mean rel. error {mean:.4f}", flush=True)
        self._t = now

    def close(self):
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, synthetic:tiny, tiny calibration")
    ap.add_argument("--shape", default="qwen-7b")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--gptaq", type=float, default=0.0, metavar="ALPHA",
                    help="time asymmetric calibration (qwen-quantize --gptaq ALPHA) instead of plain GPTQ")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shape, args.blocks, args.nsamples, args.seqlen = "tiny", 2, 4, 64
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --dry-run on a CPU machine")

    from qwen_quant.quantize.api import Progress  # noqa: F401  (same package import path as a real run)
    from qwen_quant.quantize.calibration import Calibration
    from qwen_quant.models.layouts import layout_for
    from qwen_quant.quantize.pipeline import InMemoryModel, QuantSettings, run_blocks
    from qwen_quant.models.synthetic import SYNTHETIC_SHAPES

    commit = git_commit()  # at the start: the code that makes the numbers
    wall0 = time.perf_counter()
    model = build_slice(args.shape, args.blocks, str(device))
    if device.type == "cuda":
        model.to("cpu")  # the host holds the model; the pipeline moves one block at a time to the GPU
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - wall0

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=gen)
    calib = Calibration(ids, torch.ones_like(ids), {"source": "random token ids (timing only)",
                                                     "nsamples": args.nsamples, "seqlen": args.seqlen})
    source = InMemoryModel(model, layout_for(model))
    timer = _Timer(device)
    t0 = time.perf_counter()
    settings = QuantSettings(gptaq_alpha=args.gptaq)  # qwen-quantize's defaults (+ GPTAQ when asked)
    run_blocks(source, calib, settings, device, _NoState(), timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    run_s = time.perf_counter() - t0
    block_s = [b["seconds"] for b in timer.blocks]
    capture_s = run_s - sum(block_s)
    full_depth = SYNTHETIC_SHAPES[args.shape]["num_hidden_layers"]
    mean_block = sum(block_s) / len(block_s)
    # the first block pays one-time costs (kernel selection, allocator growth): extrapolate from the rest
    steady = block_s[1:] or block_s
    steady_mean = sum(steady) / len(steady)

    result = {
        "what": f"GPTQ{f' + GPTAQ (alpha {args.gptaq})' if args.gptaq else ''} of synthetic:{args.shape}, first "
                f"{args.blocks} blocks timed, total EXTRAPOLATED to {full_depth} blocks",
        "synthetic": True,
        "shape": args.shape, "blocks_timed": args.blocks, "full_depth": full_depth,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "settings": dataclasses.asdict(settings),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "model_build_s": build_s, "capture_s": capture_s, "block_seconds": block_s,
        "mean_block_s": mean_block, "steady_block_s": steady_mean,
        "extrapolated_total_s": capture_s + steady_mean * (full_depth - 1) + block_s[0],
        "extrapolated_note": "capture + first block + (full_depth - 1) x mean of the later blocks; excludes model loading and checkpoint writing",
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "wall_s": time.perf_counter() - wall0,
        "blocks": timer.blocks,
        "env": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                "transformers": __import__("transformers").__version__, "git_commit": commit,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "gpu_quantize_timing.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['what']}: {mean_block:.2f} s/block, extrapolated total {result['extrapolated_total_s']:.0f} s, "
          f"peak allocated {result['peak_gpu_allocated_gib']} GiB -> {path}")


if __name__ == "__main__":
    main()
