"""Generation in the style of gpt-fast: `prefill`, `decode_one_token`, `decode_n_tokens`, and `generate`.

Prefill runs the prompt in one pass. Each later token is one decode step on a static KV cache. On a
GPU the step (model + sampling + advancing the token and position buffers) is captured ONCE per
KV-length bucket with torch.cuda.CUDAGraph and replayed: explicit capture rather than torch.compile
because the ctypes CUDA kernels cannot be traced (torch.compile(mode="reduce-overhead") is there
behind `compile=True` for dense models). Buckets let attention read only the written part of the
cache (rounded up to `bucket` positions) instead of all of it. On the CPU the step runs eagerly with
the position as a host int: attention reads exactly the written positions, with no mask, and the
KV write is a copy into a slice view.

No host sync per token: sampling happens on the device, and the EOS check reads the tokens back
only every `eos_check_every` tokens and at the end.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref

import torch

from qwen_quant.errors import UserError
from qwen_quant.engine.model import EAGER_OPS, Transformer, compiled_ops, ntk_alpha_for


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy(logits: torch.Tensor, row: int = 128) -> torch.Tensor:
    """logits [B, V] -> argmax [B], the first maximum on ties, exactly as logits.argmax(-1).

    On the CPU torch's argmax over a 150k vocabulary is a scalar loop (~0.3 ms, a few % of a small
    model's decode step); a vectorized max over rows of 128 logits, then an argmax over the row
    maxima and within the winning row, gives the same index in ~0.04 ms.
    """
    B, V = logits.shape
    if logits.device.type != "cpu" or V % row or V <= row:
        return logits.argmax(dim=-1)
    rows = logits.float().view(B, V // row, row)  # exact; float32 reductions are ~2x faster than bf16
    best = rows.amax(dim=-1).argmax(dim=-1, keepdim=True)  # [B, 1]: the first row holding the maximum
    within = rows.gather(1, best.unsqueeze(-1).expand(B, 1, row)).argmax(dim=-1)  # [B, 1]
    return (best * row + within).view(B)


def sample(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [B, V] -> token ids [B], on the device, with no host sync (capturable in a CUDA graph)."""
    if sampling.greedy:
        return greedy(logits)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > sampling.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # argmax(p / Exp(1)) draws from p without torch.multinomial's host sync
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def prefill(model: Transformer, input_ids: torch.Tensor, sampling: Sampling):
    """The whole prompt [B, T] in one pass -> (first new token [B], its logits [B, V])."""
    T = input_ids.shape[1]
    alpha = ntk_alpha_for(T, model.args.ntk_seq_length)
    if alpha != model.ntk_alpha:
        model.set_rope(alpha)
    logits = model(input_ids, 0)  # positions 0..T-1: causal attention over exactly the prompt
    return sample(logits, sampling), logits


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: int | torch.Tensor,
                     kv_len: int | None, sampling: Sampling):
    """token [B, 1] at input_pos (an int; or a device tensor [1], the cache read up to kv_len)
    -> (next token [B], logits [B, V])."""
    logits = model(token, input_pos, kv_len)
    return sample(logits, sampling), logits


class DecodeStep:
    """One decode step on static buffers: `token` [B, 1] -> the next token, written back into `token`.

    Eager (the CPU): the position is a host int, attention reads exactly the written cache. Bucketed
    (CUDA graphs, or torch.compile): the position lives in the device buffer `pos` [1], advanced by
    the step itself, and one graph per KV-length bucket is captured and replayed.
    """

    def __init__(self, model: Transformer, sampling: Sampling, use_graphs: bool, bucket: int = 512,
                 compile: bool = False):
        self.model, self.sampling, self.use_graphs, self.bucket = model, sampling, use_graphs, bucket
        device = model.device
        with torch.inference_mode(False):  # plain tensors, even when made inside generate_ids
            self.token = torch.zeros(model.batch_size, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.bucketed = use_graphs or compile  # fixed kv lengths: one graph (or compiled variant) per bucket
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._run = self._step
        if compile:  # torch.compile's own CUDA graphs; dense weights only (ctypes kernels cannot be traced)
            self._run = torch.compile(self._step, mode="reduce-overhead", dynamic=False)

    def _step(self, kv_len: int):
        """The bucketed step: position from the device buffer, cache read up to kv_len (masked)."""
        nxt, logits = decode_one_token(self.model, self.token, self.pos, kv_len, self.sampling)
        self.token.copy_(nxt.view_as(self.token))
        self.pos.add_(1)
        return logits

    def _eager_step(self, pos: int):
        nxt, logits = decode_one_token(self.model, self.token, pos, None, self.sampling)
        self.token.copy_(nxt.view_as(self.token))
        return logits

    def _warm_up(self, kv_len: int) -> None:
        """One eager step (compiles the fused ops); if compiling fails, fall back to the eager ops."""
        try:
            self._step(kv_len)
        except Exception as e:  # inductor/triton missing or broken: slower, still correct
            if self.model.decode_ops is EAGER_OPS:
                raise
            warnings.warn(f"fused decode ops unavailable ({type(e).__name__}: {str(e)[:200]}); using eager ops")
            self.model.decode_ops = EAGER_OPS
            self._step(kv_len)

    def kv_len_for(self, pos: int) -> int:
        """Cache positions read at position pos: exactly pos + 1 when eager, the bucket's end in a graph."""
        if not self.bucketed:
            return pos + 1
        return min(-(-(pos + 1) // self.bucket) * self.bucket, self.model.max_seq_len)

    def prepare(self, first_pos: int, last_pos: int) -> None:
        """Capture the graphs for every bucket that positions first_pos..last_pos use (before timing)."""
        if not self.use_graphs or last_pos < first_pos:
            return
        for pos in range(first_pos, last_pos + 1, self.bucket):
            self._capture(self.kv_len_for(pos))
        self._capture(self.kv_len_for(last_pos))

    def _capture(self, kv_len: int) -> None:
        if kv_len in self.graphs:
            return
        saved_token, saved_pos = self.token.clone(), self.pos.clone()
        # warm-up and capture write slot max_seq_len - 1, which no prompt occupies (a prompt leaves room
        # for at least one new token) and which the real step at that position overwrites before reading
        self.pos.fill_(self.model.max_seq_len - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.pos.fill_(self.model.max_seq_len - 1)
                self._warm_up(kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        self.pos.fill_(self.model.max_seq_len - 1)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(kv_len)
        self.graphs[kv_len] = (graph, logits)
        self.token.copy_(saved_token)
        self.pos.copy_(saved_pos)

    def __call__(self, pos: int) -> torch.Tensor:
        """Run the step for host-known position pos; returns the logits (a static buffer under graphs)."""
        if not self.bucketed:
            return self._eager_step(pos)
        kv_len = self.kv_len_for(pos)
        if not self.use_graphs:
            return self._run(kv_len)
        if kv_len not in self.graphs:
            self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        return logits


def _first_eos(tokens: torch.Tensor, eos_ids: tuple[int, ...]) -> int | None:
    """Length up to and including the first position where every row has seen an EOS; None if not yet."""
    hit = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    seen = hit.cummax(dim=1).values.all(dim=0)
    idx = torch.nonzero(seen)
    return None if idx.numel() == 0 else int(idx[0, 0]) + 1


def decode_n_tokens(step: DecodeStep, out: torch.Tensor, start: int, first_pos: int, n: int,
                    eos_ids: tuple[int, ...] = (), eos_check_every: int = 32, logits_out: list | None = None,
                    on_token=None, progress=None) -> int:
    """Decode n tokens into out[:, start:start + n] from position first_pos; returns how many were kept.

    `step.token` holds the token at first_pos. With eos_ids the loop stops at the first check after
    every row produced one (checked every eos_check_every tokens: one host sync each time).
    """
    for i in range(n):
        logits = step(first_pos + i)
        out[:, start + i].copy_(step.token[:, 0])
        if logits_out is not None:
            logits_out.append(logits.float().clone())
        if on_token is not None:
            on_token(i)
        if progress is not None:
            progress.update(1)
        if eos_ids and (i + 1) % eos_check_every == 0:
            end = _first_eos(out[:, :start + i + 1], eos_ids)
            if end is not None:
                return end - start
    return n


@dataclasses.dataclass
class GenerationOutput:
    tokens: torch.LongTensor  # [B, n] new tokens (n <= max_new_tokens; rows after their EOS keep going)
    finish_reason: str  # "eos" | "length"
    logits: list | None  # per new token [B, V] float32, when asked
    prefill_s: float
    decode_s: float


class Generator:
    """A compact model over borrowed weights, its static KV cache and its decode step, reused across calls."""

    def __init__(self, model, max_seq_len: int, kv_cache: str = "auto", batch_size: int = 1,
                 use_graphs: bool | None = None, bucket: int = 512, compile: bool = False,
                 fuse: bool | None = None):
        from qwen_quant.engine.weights import from_hf_model

        self.model = model if isinstance(model, Transformer) else from_hf_model(model)
        if max_seq_len < 2:
            raise UserError(f"max_seq_len must be at least 2 (a prompt token and a new one), not {max_seq_len}")
        self.model.setup_caches(batch_size, max_seq_len, kv_cache)
        on_cuda = self.model.device.type == "cuda"
        if use_graphs and not on_cuda:
            raise UserError("CUDA graphs need the model on a CUDA device")
        self.use_graphs = (on_cuda and not compile) if use_graphs is None else use_graphs
        self.bucket, self.compile = bucket, compile
        # fused element-wise ops in the decode step (GPU; compiled at the first decode step)
        self.fuse = (on_cuda and not compile) if fuse is None else fuse
        self.model.decode_ops = compiled_ops() if self.fuse else EAGER_OPS
        self._steps: dict[Sampling, DecodeStep] = {}

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def step_for(self, sampling: Sampling) -> DecodeStep:
        if sampling not in self._steps:
            self._steps[sampling] = DecodeStep(self.model, sampling, self.use_graphs, self.bucket, self.compile)
        return self._steps[sampling]

    def check_lengths(self, input_ids: torch.Tensor, max_new_tokens: int) -> None:
        B, T = input_ids.shape
        if B != self.model.batch_size:
            raise UserError(f"batch size {B} does not match the engine's {self.model.batch_size}")
        if T < 1 or max_new_tokens < 1:
            raise UserError("give at least one prompt token and ask for at least one new token")
        if T + max_new_tokens > self.max_seq_len:
            raise UserError(f"prompt ({T}) + new tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds the "
                            f"KV cache of {self.max_seq_len} positions: raise max_seq_len or ask for fewer tokens")

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                     eos_ids: tuple[int, ...] = (), eos_check_every: int = 32, return_logits: bool = False,
                     on_token=None, progress=None) -> GenerationOutput:
        """input_ids [B, T] -> up to max_new_tokens new tokens (exactly that many when eos_ids is empty)."""
        input_ids = input_ids.to(self.model.device)
        self.check_lengths(input_ids, max_new_tokens)
        B, T = input_ids.shape
        step = self.step_for(sampling)
        step.prepare(T, T + max_new_tokens - 2)
        with torch.inference_mode(False):  # the tokens returned are a plain tensor
            out = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
        logits_out = [] if return_logits else None
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        first, logits = prefill(self.model, input_ids, sampling)
        out[:, 0] = first
        if logits_out is not None:
            logits_out.append(logits.float().clone())
        step.token.copy_(first.view(B, 1))
        step.pos.fill_(T)
        if on_token is not None:
            on_token(-1)
        if progress is not None:
            progress.update(1)
        sync()
        t1 = time.perf_counter()
        n = 1
        done = bool(eos_ids) and _first_eos(out[:, :1], eos_ids) is not None
        if not done and max_new_tokens > 1:
            n += decode_n_tokens(step, out, 1, T, max_new_tokens - 1, eos_ids, eos_check_every,
                                 logits_out, on_token, progress)
        end = _first_eos(out[:, :n], eos_ids) if eos_ids else None
        sync()
        t2 = time.perf_counter()
        n = end or n
        if logits_out is not None:
            logits_out = logits_out[:n]
        return GenerationOutput(out[:, :n], "eos" if end else "length", logits_out, t1 - t0, t2 - t1)


# ---------------------------------------------------------------- public API

@dataclasses.dataclass
class GenerateResult:
    """What qwen_quant.generate returns. `text` is None when no tokenizer was at hand."""

    text: str | None  # the new tokens decoded (row 0)
    token_ids: list[int]  # the new tokens (row 0)
    prompt_ids: list[int]
    finish_reason: str  # "eos" | "length"
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.prefill_s + self.decode_s, 1e-9)

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _resolve_model(model, device):
    """(model, tokenizer) from an HF model instance, or anything a MODEL argument names (models.load)."""
    if isinstance(model, torch.nn.Module):
        return model, None
    if not isinstance(model, str):
        raise UserError("model must be a transformers model, a model spec ('demo', 'synthetic:tiny', a hub id) "
                        "or a checkpoint folder")
    from qwen_quant.models.load import load

    loaded = load(model, device=device)
    return loaded.model, loaded.tokenizer


def _encode(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise UserError("a text prompt needs a tokenizer: pass tokenizer=..., or give the prompt as token ids")
        from qwen_quant.models.tokenizers import encode_text

        return encode_text(tokenizer, prompt)
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise UserError("qwen_quant.generate takes one prompt; use Generator.generate_ids for a batch")
        ids = ids[0]
    return [int(t) for t in ids]


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if e is not None and int(e) not in ids:
                ids.append(int(e))
        if ids:
            break
    return tuple(ids)


def generate(model, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, *, tokenizer=None, stop_at_eos: bool = True, kv_cache: str = "auto",
             device: str | None = None, seed: int | None = None, max_seq_len: int | None = None,
             quiet: bool = True) -> GenerateResult:
    """Generate with the fast engine.

    model: a transformers model instance (dense or with QuantLinear layers), a model spec
      ("demo", "synthetic:tiny", a hub id, a folder) or a quantized checkpoint folder.
    prompt: text (needs a tokenizer: given, or the one loaded with a spec) or token ids.
    temperature 0 is greedy; otherwise temperature, top_k (0 = off) and top_p (1 = off) sampling;
    seed seeds the device's default generator. Stops at EOS (checked every 32 tokens, then trimmed)
    or after exactly max_new_tokens. The engine (static KV cache, captured graphs) is kept with the
    model and reused while max_seq_len and kv_cache fit.
    Returns a GenerateResult: .text, .token_ids, .prompt_ids, .finish_reason, timings.
    """
    hf_model, loaded_tok = _resolve_model(model, device or "cpu")
    tokenizer = tokenizer or loaded_tok
    prompt_ids = _encode(prompt, tokenizer)
    need = len(prompt_ids) + max_new_tokens
    gen = _GENERATORS.get(hf_model)
    if gen is None or gen.max_seq_len < need or gen.model.kv_kind != kv_cache:
        gen = None
        _GENERATORS.pop(hf_model, None)  # free the old cache first
        gen = Generator(hf_model, max_seq_len or need, kv_cache)
        _GENERATORS[hf_model] = gen
    if seed is not None:
        torch.manual_seed(seed)
    eos = _eos_ids(hf_model, tokenizer) if stop_at_eos else ()
    progress = None
    if not quiet:
        from tqdm import tqdm

        progress = tqdm(total=max_new_tokens, desc="generate", unit="tok")
    try:
        out = gen.generate_ids(torch.tensor([prompt_ids]), max_new_tokens, Sampling(temperature, top_k, top_p),
                               eos_ids=eos, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    ids = out.tokens[0].tolist()
    text = tokenizer.decode(ids) if tokenizer is not None else None
    return GenerateResult(text, ids, prompt_ids, out.finish_reason, out.prefill_s, out.decode_s)
