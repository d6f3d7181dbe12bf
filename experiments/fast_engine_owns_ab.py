"""A/B of the fast engine keeping (owns_model=False) or dropping (True) the dense BF16 weights it packed for oneDNN:
decode tokens/s of one model, 3 x 64 tokens after a warm-up, in this process (run it alternating, e.g.
`for o in 0 1 0 1; do python experiments/fast_engine_owns_ab.py MODEL $o; done`, from outside the repository).

    python experiments/fast_engine_owns_ab.py MODEL 0|1
"""

import sys

import torch

from qwen_quant.engine.fast import FastEngine
from qwen_quant.models.load import load_model


def main(model: str, owns: bool) -> None:
    m = load_model(model, dtype=torch.bfloat16).model
    engine = FastEngine(m, 80, owns_model=owns)
    ids = torch.randint(100, 15000, (1, 1), generator=torch.Generator().manual_seed(0))
    engine.timed_generate(ids, 16)
    for _ in range(3):
        r = engine.timed_generate(ids, 64)
        print(f"owns_model={owns} decode {len(r['token_s']) / sum(r['token_s']):.2f} tok/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
