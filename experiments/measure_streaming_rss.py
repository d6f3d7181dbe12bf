#!/usr/bin/env python
"""Measure host RAM when quantizing a safetensors folder through the streaming path.

    python experiments/measure_streaming_rss.py [--work /tmp/qq-rss] [--layers 96] [--keep]

Writes a synthetic Qwen2-shaped model (random bf16 weights, sharded safetensors, written tensor by
tensor so this process never holds it either) into --work, quantizes it in a subprocess with
`qwen_quant.quantize` (which streams one block at a time from the shards), and reads the child's peak
RSS from the kernel (getrusage RUSAGE_CHILDREN ru_maxrss: exact, no sampling). The goal: peak RSS
<= 1/4 of the weights' size. Writes reports/quantize-streaming-rss.{json,md}.

Calibration is random token ids (RAM does not depend on the text; the tokenizer and corpora are not
what is measured). The weights are random: the checkpoint is synthetic and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from qwen_quant.provenance import git_commit

REPO = Path(__file__).resolve().parent.parent

# Qwen2 layout, small hidden size and many blocks: the weights are large, one block is small.
SHAPE = dict(model_type="qwen2", hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096,
             tie_word_embeddings=False, attention_bias=True)

CHILD = r"""
import json, sys, time, torch
from qwen_quant.quantize.api import quantize
from qwen_quant.quantize.calibration import Calibration
folder, out, n, L, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(0))
calib = Calibration(ids, torch.ones_like(ids), {"source": "random token ids (RSS measurement)", "nsamples": n, "seqlen": L})
t = time.perf_counter()
quantize(folder, out, calib=calib, nsamples=n, seqlen=L, device="cpu", max_shard_size="1GB", quiet=True)
print(json.dumps({"quantize_s": time.perf_counter() - t}))
"""


def write_synthetic_folder(folder: Path, layers: int) -> int:
    """A sharded safetensors Qwen2 folder with random bf16 weights; returns the weights' bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_quant.quantize.writer import TensorEntry, write_weights

    d = dict(SHAPE)
    cfg = AutoConfig.for_model(d.pop("model_type"), num_hidden_layers=layers, **d)
    cfg.synthetic = True
    cfg.synthetic_shape = f"rss-qwen2-h{SHAPE['hidden_size']}-l{layers}"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)

    def random_like(shape, name):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    entries = [TensorEntry(n, tuple(p.shape), torch.bfloat16, (lambda s=tuple(p.shape), n=n: random_like(s, n)))
               for n, p in skeleton.named_parameters()]
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder, entries, 1_000_000_000)
    cfg.save_pretrained(folder)
    return sum(e.nbytes for e in entries)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qq-streaming-rss"))
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--reports", type=Path, default=REPO / "reports")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the quantizing process")
    ap.add_argument("--keep", action="store_true", help="keep the model and checkpoint in --work")
    args = ap.parse_args(argv)

    src, out = args.work / "model", args.work / "int4"
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    weights = write_synthetic_folder(src, args.layers)
    write_s = time.perf_counter() - t0
    print(f"wrote {weights / 1e9:.2f} GB of bf16 weights in {write_s:.0f} s", flush=True)

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    # one thread: on a shared, busy box two OpenMP threads spin-wait on each other (RSS is unaffected)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(args.nsamples), str(args.seqlen),
                           str(SHAPE["vocab_size"])], cwd="/tmp", env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"quantization failed:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        sys.exit("could not read the child's peak RSS")
    peak = peak_kib * 1024
    ckpt_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    report = json.loads((out / "quant_report.json").read_text())
    result = {
        "what": "peak RSS of qwen_quant.quantize streaming a synthetic safetensors folder block by block (CPU)",
        "synthetic": True,
        "model": {"layout": "qwen2", **SHAPE, "num_hidden_layers": args.layers, "dtype": "bfloat16",
                  "weights_bytes": weights, "shards": len(list(src.glob("*.safetensors")))},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "source": "random token ids"},
        "peak_rss_bytes": peak,
        "peak_rss_fraction_of_weights": peak / weights,
        "goal": "peak RSS <= 1/4 of the weights",
        "goal_met": peak <= weights / 4,
        "quantize_wall_s": wall,
        "threads": args.threads,
        "checkpoint_bytes": ckpt_bytes,
        "layers_quantized": report["totals"]["layers"],
        "mean_rel_error": report["totals"]["mean_rel_error"],
        "method": "getrusage(RUSAGE_CHILDREN).ru_maxrss of the quantizing subprocess (kernel-tracked peak)",
        "env": {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "python": platform.python_version(),
                "torch": torch.__version__, "git_commit": git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": "python experiments/measure_streaming_rss.py " + " ".join(argv if argv is not None else sys.argv[1:])},
    }
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "quantize-streaming-rss.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.reports / "quantize-streaming-rss.md").write_text(_markdown(result))
    print(f"peak RSS {peak / 2**20:.0f} MiB = {peak / weights:.3f} x the weights ({weights / 2**30:.2f} GiB): "
          f"goal {'met' if result['goal_met'] else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


def _markdown(r: dict) -> str:
    m = r["model"]
    return "\n".join([
        "# Host RAM while quantizing a safetensors model (streaming path)",
        "",
        "SYNTHETIC model (random weights): this measures memory, not accuracy.",
        "",
        "| weights (bf16) | blocks | peak RSS | peak RSS / weights | goal (<= 0.25) | quantize wall |",
        "|---|---|---|---|---|---|",
        f"| {m['weights_bytes'] / 2**30:.2f} GiB in {m['shards']} shards | {m['num_hidden_layers']} | "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['peak_rss_fraction_of_weights']:.3f} | "
        f"{'met' if r['goal_met'] else 'NOT met'} | {r['quantize_wall_s']:.0f} s |",
        "",
        f"Shape: Qwen2 layout, hidden {m['hidden_size']}, FFN {m['intermediate_size']}, {m['num_attention_heads']} heads, "
        f"vocab {m['vocab_size']}, q/k/v bias. Calibration: {r['calibration']['nsamples']} x {r['calibration']['seqlen']} "
        "random token ids. GPTQ 4-bit, group 128, on the CPU.",
        "",
        "How: the model is written tensor by tensor as sharded safetensors; `qwen_quant.quantize` runs in a subprocess "
        "with the model skeleton on the meta device, reads one block's tensors with plain file reads (no mmap, so "
        "shard pages never count as its RSS), quantizes it, saves its packed tensors to the run state, frees it; the "
        "checkpoint is then assembled one tensor at a time. Peak RSS is the kernel's `ru_maxrss` of that subprocess. "
        "About 0.4 GiB of the peak is the Python, torch and transformers imports alone.",
        "",
        f"Provenance: {r['env']['date']}, commit {r['env']['git_commit']}, {r['env']['machine']}, torch {r['env']['torch']}, "
        f"`{r['env']['command']}`.",
        "",
    ])


if __name__ == "__main__":
    main()
