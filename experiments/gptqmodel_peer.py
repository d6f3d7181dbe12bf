#!/usr/bin/env python
"""Quantize a model with GPTQModel (the peer) on exactly our calibration tokens. Runs in the peer's own
environment (.venv-peer: torch + gptqmodel==7.6.0, never the user's), imports nothing of ours.

    .venv/bin/python experiments/gptqmodel_peer.py export MODEL CALIB.pt --calib default --nsamples 16 --seqlen 512
    .venv-peer/bin/python experiments/gptqmodel_peer.py quantize MODEL CALIB.pt OUT '{"desc_act": false, ...}'

`export` (our environment) writes the calibration token ids our qwen-quantize would use; `quantize` (the peer's
environment) feeds the same ids to GPTQModel.quantize and saves its checkpoint, which our loader reads
(qwen-eval OUT ...). Settings are QuantizeConfig keyword arguments; bits 4, group 128, sym unless given.
GPTQModel's group-aware reordering (act_group_aware) is off unless asked for: it is not GPTQ as we run it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def export(model: str, path: str, calib: str, nsamples: int, seqlen: int, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer

    from qwen_quant.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(model)
    cal = build_calibration(tok, calib, nsamples, seqlen, seed)
    torch.save({"input_ids": cal.input_ids, "attention_mask": cal.attention_mask, "description": cal.description}, path)
    print(f"{path}: {cal.nsamples} x {cal.seqlen} tokens from {calib!r}")


def quantize(model: str, calib_path: str, out: str, settings: dict) -> dict:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import GPTQModel, QuantizeConfig

    data = torch.load(calib_path)
    cfg = QuantizeConfig(**({"bits": 4, "group_size": 128, "sym": True, "act_group_aware": False} | settings))
    loaded = GPTQModel.load(model, cfg, device="cpu")
    calib = [{"input_ids": ids[m.bool()].tolist(), "attention_mask": m[m.bool()].tolist()}
             for ids, m in zip(data["input_ids"], data["attention_mask"])]
    t0 = time.perf_counter()
    loaded.quantize(calib, batch_size=1)
    seconds = time.perf_counter() - t0
    loaded.save(out)
    import gptqmodel

    facts = {"quantizer": f"gptqmodel {gptqmodel.__version__}", "settings": settings, "seconds": round(seconds, 1),
             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
             "threads": torch.get_num_threads(), "calibration": data.get("description")}
    with open(os.path.join(out, "peer_quantize.json"), "w") as f:
        json.dump(facts, f, indent=1, default=str)
    return facts


def main(argv: list[str]) -> int:
    if argv[:1] == ["export"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("model"), p.add_argument("path")
        p.add_argument("--calib", default="default")
        p.add_argument("--nsamples", type=int, default=16)
        p.add_argument("--seqlen", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        export(a.model, a.path, a.calib, a.nsamples, a.seqlen, a.seed)
        return 0
    if argv[:1] == ["quantize"] and len(argv) == 5:
        print(json.dumps(quantize(argv[1], argv[2], argv[3], json.loads(argv[4])), default=str))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
