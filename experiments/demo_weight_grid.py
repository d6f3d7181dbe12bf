#!/usr/bin/env python
"""Is the demo model's "fp" reference already on a 4-bit grid? Prints, per linear of a few blocks, how far
round-to-nearest on GGUF Q4_1's grid (blocks of 32 input weights, 16 levels between the block's min and max,
a float offset) lands from the weights, and how many distinct values a group of 32 / 128 holds.

A zero error means the weights are exactly Q4_1 values (the demo ships as a Q4_1 GGUF, dequantized to fp32):
Int4 quantization of the demo measures re-quantizing one 4-bit grid onto another. The GPTQ format cannot hold
that grid exactly even at group size 32: its zero point is an integer code, Q4_1's offset is any float.

    .venv/bin/python experiments/demo_weight_grid.py [--blocks 0,15,29]
"""

from __future__ import annotations

import argparse

import torch


def q4_1_roundtrip_error(weight: torch.Tensor, block: int = 32) -> float:
    """max |w - RTN_Q4_1(w)| / max |w|, in float64."""
    w = weight.double().reshape(-1, block)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    step = ((hi - lo) / 15).clamp_min(1e-30)
    back = ((w - lo) / step).round() * step + lo
    return ((back - w).abs().max() / w.abs().max()).item()


def distinct_per_group(weight: torch.Tensor, group: int, rows: int = 2000) -> float:
    w = weight.reshape(-1, group)[:rows]
    return sum(len(torch.unique(r)) for r in w) / len(w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,15,29", help="decoder blocks to check (comma list)")
    args = p.parse_args()
    from qwen_quant.models.layouts import blocks_of, layout_for
    from qwen_quant.models.load import load_model

    model = load_model("demo").model.float()
    layout = layout_for(model)
    wanted = {int(b) for b in args.blocks.split(",")}
    print("| block | linear | shape | Q4_1 round-trip error (rel. max) | distinct values / 32 | distinct / 128 |")
    print("|---|---|---|---|---|---|")
    for i, block in enumerate(blocks_of(model, layout)):
        if i not in wanted:
            continue
        for name in layout.linear_names:
            w = block.get_submodule(name).weight.detach()
            print(f"| {i} | {name} | {tuple(w.shape)} | {q4_1_roundtrip_error(w):.1e} | "
                  f"{distinct_per_group(w, 32):.1f} | {distinct_per_group(w, 128):.1f} |")


if __name__ == "__main__":
    main()
