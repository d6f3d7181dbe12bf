"""FastEngine: the fast decode loop behind qwen-profile's `--engine fast`.

`timed_generate` returns the time to the first token and the latency of every later token. On a
GPU each latency comes from CUDA events recorded between graph replays and read once at the end,
so timing adds no host sync per token; on the CPU it is the wall clock (the work is synchronous).
"""

from __future__ import annotations

import time

import torch

from qwen_quant.errors import UserError
from qwen_quant.engine.generate import Generator, Sampling
from qwen_quant.engine.kv_cache import KV_CACHE_KINDS


class FastEngine:
    name = "fast"

    def __init__(self, model, max_seq_len: int, device="cpu", kv_cache: str = "auto", batch_size: int = 1,
                 use_graphs: bool | None = None, bucket: int = 512, fuse: bool | None = None,
                 owns_model: bool = False):
        """owns_model: the caller will never run `model` itself (qwen-profile's cells), so the dense weights the
        engine repacked are dropped from it (Transformer.release_packed_sources): one copy in memory, not two."""
        if kv_cache not in KV_CACHE_KINDS:
            raise UserError(f"unknown KV cache {kv_cache!r}; choose one of: {', '.join(KV_CACHE_KINDS)}")
        device = torch.device(device)
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != device.type:
            model.to(device)
        self.device = device
        self.kv_cache = kv_cache
        self.generator = Generator(model, max_seq_len, kv_cache, batch_size, use_graphs, bucket, fuse=fuse)
        if owns_model and self.generator.model.release_packed_sources():
            import gc

            from qwen_quant.host_memory import release_freed_memory

            gc.collect()
            release_freed_memory()

    def describe(self) -> dict:
        """What a results row records about this engine."""
        g = self.generator
        return {"engine": self.name, "kv_cache": self.kv_cache, "kv_dtype": str(g.model.dtype).replace("torch.", "")
                if self.kv_cache == "auto" else self.kv_cache, "cuda_graphs": g.use_graphs,
                "graph_bucket": g.bucket if g.use_graphs else None, "fused_ops": g.fuse, "max_seq_len": g.max_seq_len}

    @torch.inference_mode()
    def timed_generate(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        """Greedy, exactly new_tokens (EOS ignored) -> {"prefill_s", "token_s" (each later token), "tokens"}."""
        gen = self.generator
        input_ids = input_ids.to(self.device)
        gen.check_lengths(input_ids, new_tokens)
        T = input_ids.shape[1]
        gen.step_for(Sampling()).prepare(T, T + new_tokens - 2)  # graph capture stays out of the timing
        if self.device.type == "cuda":
            return self._timed_cuda(input_ids, new_tokens)
        stamps = []
        t0 = time.perf_counter()
        out = gen.generate_ids(input_ids, new_tokens, on_token=lambda i: stamps.append(time.perf_counter()))
        return _result(out.tokens, t0, stamps, lambda a, b: b - a)

    def _timed_cuda(self, input_ids, new_tokens):
        events = []

        def record(_):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)

        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.generator.generate_ids(input_ids, new_tokens, on_token=record)
        torch.cuda.synchronize()
        return _result(out.tokens, start, events, lambda a, b: a.elapsed_time(b) / 1e3)


def _result(tokens, start, stamps, seconds_between) -> dict:
    marks = [start] + stamps
    return {"prefill_s": seconds_between(marks[0], marks[1]),
            "token_s": [seconds_between(a, b) for a, b in zip(marks[1:], marks[2:])],
            "tokens": tokens.cpu()}
