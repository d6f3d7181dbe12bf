"""Small random transformers models and token ids shared by the tests (on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

import torch


def tiny_causal_lm(kind: str = "qwen2", dtype: torch.dtype = torch.float32, **extra):
    """A small random model: qwen2 (q/k/v bias), qwen3 (q/k norm) or llama; `extra` overrides the config.

    Weights are drawn larger than the init's 0.02, so logits are far from uniform and greedy ties unlikely.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=200, max_position_embeddings=256)
    config.update(extra)
    model = AutoModelForCausalLM.from_config(
        {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[kind](**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def random_ids(n: int, vocab: int = 200, seed: int = 1) -> torch.Tensor:
    """[1, n] token ids below `vocab`, the same for the same seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
