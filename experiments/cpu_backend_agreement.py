"""Does the CPU backend compute what the torch reference backend computes? (issue 22)

    python experiments/cpu_backend_agreement.py OUT.json CHECKPOINT [CHECKPOINT ...] [--tokens 16]

For each checkpoint and three prompts (English, Chinese, code):
1. float32 activations, HF greedy decoding: the torch backend against the CPU backend (which then dequantizes
   with the checkpoint's scales, the torch backend's arithmetic): the same tokens are expected.
2. BF16 activations (how Int4 runs on the CPU), teacher-forced over the prompt and its float32 continuation:
   the torch backend and the CPU backend each against the float32 reference: top-1 agreement, mean KL(ref ‖ x)
   and the mean |Δ log p| of the actual next token. Two correct BF16 computations differ from float32 (and so
   from each other) by rounding; the question is whether the CPU backend is as close as the reference
   backend is. (Greedy tokens in BF16 may part at a near-tie between any two correct kernels.)
Writes OUT.json and prints one line per (checkpoint, prompt).
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


def set_backend(model, name):
    from qwen_quant.kernels.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_backend(name)
    return sorted({layer.backend for layer in layers}), len(layers)


def greedy(model, ids, tokens):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def log_probs(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(seq).logits[0, :-1].float(), -1)


def closeness(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    kl = (ref.exp() * (ref - got)).sum(-1)
    nll_ref, nll_got = ref.gather(1, targets[:, None]), got.gather(1, targets[:, None])
    return {"top1_agreement": round((ref.argmax(-1) == got.argmax(-1)).float().mean().item(), 4),
            "mean_kl": float(f"{kl.mean().item():.3g}"),
            "mean_abs_dlogp_next": float(f"{(nll_ref - nll_got).abs().mean().item():.3g}")}


def compare(checkpoint: str, tokens: int) -> list[dict]:
    from transformers import AutoTokenizer

    from qwen_quant.kernels.loader import load_quantized

    tok = AutoTokenizer.from_pretrained(checkpoint)
    fp32 = load_quantized(checkpoint, backend="torch", dtype=torch.float32)
    rows = []
    for name, text in PROMPTS.items():
        ids = torch.tensor([tok.encode(text)])
        set_backend(fp32, "torch")
        t0 = time.perf_counter()
        want = greedy(fp32, ids, tokens)
        t_torch = time.perf_counter() - t0
        plans, n_layers = set_backend(fp32, "cpu")
        t0 = time.perf_counter()
        got = greedy(fp32, ids, tokens)
        t_cpu = time.perf_counter() - t0
        seq = torch.tensor([ids[0].tolist() + want])
        set_backend(fp32, "torch")
        ref = log_probs(fp32, seq)
        rows.append({"checkpoint": checkpoint, "prompt": name, "layers": n_layers, "backends": plans,
                     "fp32_greedy_tokens": tokens, "fp32_greedy_identical": got == want,
                     "fp32_first_divergence": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None),
                     "seconds_fp32_greedy": {"torch": round(t_torch, 1), "cpu": round(t_cpu, 1)},
                     "text": tok.decode(want), "seq": seq[0].tolist(), "ref": ref})
    del fp32
    bf16 = load_quantized(checkpoint, backend="torch", dtype=torch.bfloat16)
    for row in rows:
        seq, ref = torch.tensor([row.pop("seq")]), row.pop("ref")
        targets = seq[0, 1:]
        row["bf16_vs_fp32_reference"] = {}
        for backend in ("torch", "cpu"):
            set_backend(bf16, backend)
            row["bf16_vs_fp32_reference"][backend] = closeness(ref, log_probs(bf16, seq), targets)
        b = row["bf16_vs_fp32_reference"]
        print(f"{checkpoint} {row['prompt']}: fp32 greedy {'identical' if row['fp32_greedy_identical'] else 'DIFFERENT'} "
              f"({tokens} tokens, {row['layers']} layers on {row['backends']}); bf16 top-1 agreement with fp32: "
              f"torch {b['torch']['top1_agreement']:.3f}, cpu {b['cpu']['top1_agreement']:.3f}; mean KL torch "
              f"{b['torch']['mean_kl']:.2g}, cpu {b['cpu']['mean_kl']:.2g}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    from qwen_quant.files import write_text_atomic
    from qwen_quant.provenance import collect_env

    rows = [r for c in args.checkpoints for r in compare(c, args.tokens)]
    write_text_atomic(args.out, json.dumps({"provenance": collect_env(), "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
