#!/usr/bin/env python
"""Would one int4 kernel call for q/k/v (and one for gate/up) speed up CPU decode? A one-row probe.

Times torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu, what the `cpu` backend calls for decode) at
Qwen2.5-1.5B's shapes (hidden 1536, q 1536, k/v 256, gate/up 8960, groups of 128), one BF16 row, random codes:
the three (two) projections as separate calls against one call on the rows stacked. The difference is what
fusing the calls could save per layer and token.

    python experiments/cpu_int4_fusion_probe.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

HIDDEN, Q, KV, FFN, GROUP = 1536, 1536, 256, 8960, 128


def packed(n: int, k: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scale_zero = torch.randn(k // GROUP, n, 2, generator=gen).to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scale_zero


def microseconds(fn, reps: int) -> float:
    for _ in range(max(10, reps // 20)):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    x = torch.randn(1, HIDDEN, generator=gen).to(torch.bfloat16)

    def call(w):
        return lambda: mm(x, w[0], GROUP, w[1])

    def calls(*ws):
        fns = [call(w) for w in ws]
        return lambda: [f() for f in fns]

    q, k, v, qkv = (packed(n, HIDDEN, gen) for n in (Q, KV, KV, Q + 2 * KV))
    gate, up, gate_up = (packed(n, HIDDEN, gen) for n in (FFN, FFN, 2 * FFN))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.2f}")
    rows = [("q, k, v: three calls", calls(q, k, v), 3000), ("q/k/v stacked: one call", call(qkv), 3000),
            ("gate, up: two calls", calls(gate, up), 400), ("gate/up stacked: one call", call(gate_up), 400)]
    times = {name: microseconds(fn, reps) for name, fn, reps in rows}
    for name, us in times.items():
        print(f"  {name:28s} {us:9.1f} us")
    for split, fused in ((rows[0][0], rows[1][0]), (rows[2][0], rows[3][0])):
        print(f"  saved by one call: {times[split] - times[fused]:7.1f} us ({1 - times[fused] / times[split]:.1%})")


if __name__ == "__main__":
    main()
