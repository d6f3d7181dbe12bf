"""Greedy tokens of an Int4 checkpoint through the CPU backend against the torch reference backend (issue 22).

    python experiments/cpu_backend_agreement.py OUT.json CHECKPOINT [CHECKPOINT ...] [--tokens 32]

Both runs: the same model in BF16 on the CPU (how Int4 runs there), HF greedy generate, three prompts (English,
Chinese, code). Two correct BF16 computations may part at a near-tie, so each divergence is reported with the
reference's top-two logit margin at that step beside BF16's noise there (2 ulps of the top logit).
Writes OUT.json (and prints one line per prompt).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPTS = {
    "en": "The history of the printing press begins",
    "zh": "北京是中国的首都，",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
}


def greedy(model, ids, tokens):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0].float() for s in out.scores]


def set_backend(model, name):
    from qwen_quant.kernels.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_backend(name)
    return sorted({layer.backend for layer in layers}), len(layers)


def compare(checkpoint: str, tokens: int) -> list[dict]:
    from transformers import AutoTokenizer

    from qwen_quant.kernels.loader import load_quantized

    model = load_quantized(checkpoint, backend="torch", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    rows = []
    for name, text in PROMPTS.items():
        ids = torch.tensor([tok.encode(text)])
        set_backend(model, "torch")
        t0 = time.perf_counter()
        want, scores = greedy(model, ids, tokens)
        t_ref = time.perf_counter() - t0
        plans, n_layers = set_backend(model, "auto")
        t0 = time.perf_counter()
        got, _ = greedy(model, ids, tokens)
        t_cpu = time.perf_counter() - t0
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        row = {"checkpoint": checkpoint, "prompt": name, "tokens": tokens, "layers": n_layers, "backends": plans,
               "identical": first is None, "first_divergence": first, "seconds_torch": round(t_ref, 1),
               "seconds_cpu": round(t_cpu, 1), "text_torch": tok.decode(want), "text_cpu": tok.decode(got)}
        if first is not None:
            top2 = scores[first].topk(2).values
            row["margin_at_divergence"] = round((top2[0] - top2[1]).item(), 4)
            row["bf16_noise_there"] = round(2 * 2.0 ** -7 * top2[0].abs().item(), 4)
        rows.append(row)
        print(f"{checkpoint} {name}: {'identical' if first is None else f'first divergence at token {first}'} "
              f"({tokens} tokens; torch {t_ref:.0f} s, cpu {t_cpu:.0f} s; {n_layers} layers on {plans})", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    from qwen_quant.files import write_text_atomic
    from qwen_quant.provenance import collect_env

    rows = [r for c in args.checkpoints for r in compare(c, args.tokens)]
    write_text_atomic(args.out, json.dumps({"provenance": collect_env(), "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
