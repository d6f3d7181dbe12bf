"""The `hf` engine: transformers `generate` with its default cache, greedy, exact lengths (the seed's method).

Per-token times come from a logits processor that `generate` calls once per new token, right
after that token's forward pass: on a GPU it records a CUDA event (no host sync, so the
measurement does not slow the loop), on the CPU it reads the wall clock.
"""

from __future__ import annotations

import time

import torch


class _TokenClock:
    """Timestamps: one at the start, one per new token (after its logits), one at the end."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.marks: list = []

    def mark(self):
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds of each mark after the first."""
        if self.on_gpu:
            self.marks[-1].synchronize()
            first = self.marks[0]
            return [first.elapsed_time(m) / 1e3 for m in self.marks[1:]]
        return [m - self.marks[0] for m in self.marks[1:]]


class _ClockProcessor:
    """A logits processor that changes nothing and marks the time each token's logits are ready."""

    def __init__(self, clock: _TokenClock):
        self.clock = clock

    def __call__(self, input_ids, scores):
        self.clock.mark()
        return scores


class HFEngine:
    name = "hf"

    def __init__(self, model, max_seq_len: int, device: str, kv_cache: str = "auto", batch_size: int = 1):
        # batch_size: the common constructor (engine/__init__.py); generate takes its batch from input_ids
        if kv_cache not in ("auto", None):
            from qwen_quant.errors import UserError

            raise UserError("the hf engine uses transformers' default cache; --kv-cache is for --engine fast")
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = device

    @torch.inference_mode()
    def timed_generate(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        from transformers import LogitsProcessorList

        on_gpu = self.device.startswith("cuda")
        input_ids = input_ids.to(self.device)
        clock = _TokenClock(on_gpu)
        if on_gpu:
            torch.cuda.synchronize()
        clock.mark()
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # exact length: EOS is masked out
            do_sample=False, num_beams=1, use_cache=True,
            logits_processor=LogitsProcessorList([_ClockProcessor(clock)]),
            pad_token_id=_pad_id(self.model), temperature=None, top_p=None, top_k=None,
        )
        clock.mark()
        stamps = clock.seconds()  # per-token marks..., end
        token_marks, total = stamps[:-1], stamps[-1]
        tokens = out[:, input_ids.shape[1]:]
        if tokens.shape[1] != new_tokens or len(token_marks) != new_tokens:
            raise RuntimeError(f"generate returned {tokens.shape[1]} tokens, expected exactly {new_tokens}")
        return {
            "prefill_s": token_marks[0],
            "token_s": [b - a for a, b in zip(token_marks[:-1], token_marks[1:])],
            "tokens": tokens.cpu(),
            "total_s": total,
        }


def _pad_id(model) -> int:
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "pad_token_id", None), getattr(gc, "eos_token_id", None)):
        if isinstance(v, (list, tuple)) and v:
            return v[0]
        if isinstance(v, int):
            return v
    return 0
