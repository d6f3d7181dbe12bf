"""The fast engine's own compact decoder: plain modules over weights borrowed from another model.

One definition covers the layouts of models/layouts.py (Qwen v1, Qwen2/2.5, Qwen3, llama): they
differ only in a fused or split q/k/v projection, q/k bias (carried by the linears themselves),
Qwen3's per-head q/k RMSNorm, partial rotary (Qwen v1's rotary_pct) and Qwen v1's log-n query
scaling. The linears are whatever modules the source model holds (nn.Linear or QuantLinear), so
every kernel backend runs unchanged. Weights are attached by name in weights.py.

Positions come in one of two forms. An int (the first position of the T tokens, known on the host:
prefill and the eager decode step) reads exactly the written part of the static KV cache, so
attention needs no mask (causal within the T tokens). A LongTensor on the device (what a captured
CUDA graph replays) reads the cache up to `kv_len`, a length bucket fixed per graph, and masks
the slots past each query's own position.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_quant.workarounds import is_canonical_input_hook


@dataclasses.dataclass
class ModelArgs:
    layout: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_dims: int  # rotated dims per head (Qwen v1: rotary_pct * head_dim)
    qk_norm: bool = False  # Qwen3
    logn_seq_length: int | None = None  # Qwen v1 use_logn_attn: scale queries past its training length
    ntk_seq_length: int | None = None  # Qwen v1 use_dynamic_ntk: raise the rope base for long prompts
    rope_base: float = 10000.0  # only used where the rope is rebuilt for dynamic NTK


class RMSNorm(nn.Module):
    """RMSNorm in float32, cast back before the weight (the order transformers uses, for equal bits)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm: (x + delta, norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, rope_dims], sin with its first half negated (Transformer.set_rope), so
    x * cos + roll(x) * sin is transformers' x * cos + rotate_half(x) * sin bit for bit, in four ops
    instead of seven. Dims past rope_dims pass through (partial rotary)."""
    if rope_dims == x.shape[-1]:
        return x * cos + x.roll(rope_dims // 2, -1) * sin
    rot, rest = x[..., :rope_dims], x[..., rope_dims:]
    return torch.cat((rot * cos + rot.roll(rope_dims // 2, -1) * sin, rest), dim=-1)


def rope_qk(q, k, cos, sin, rope_dims: int, q_scale):
    q = apply_rope(q, cos, sin, rope_dims)
    if q_scale is not None:
        q = q * q_scale
    return q, apply_rope(k, cos, sin, rope_dims)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The small element-wise steps between the matmuls. A decode step on a GPU uses fused (compiled)
    versions: each becomes one kernel instead of five to ten, which matters when a token is ~1,500
    tiny launches. The matmuls (our ctypes/Triton kernels) and attention stay outside compile."""

    add_norm: object = add_rms_norm
    rope: object = rope_qk
    silu_mul: object = silu_mul


EAGER_OPS = Ops()


def compiled_ops(backend: str = "inductor") -> Ops:
    """torch.compile'd element-wise ops for the T == 1 decode shapes (compiled at the first decode step)."""
    def comp(fn):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    return Ops(comp(add_rms_norm), comp(rope_qk), comp(silu_mul))


class PackedLinear(nn.Module):
    """Borrowed bf16 nn.Linears that read the same input (one, or q/k/v, or gate/up), as one product on the CPU
    with the weight packed once into oneDNN's blocked layout.

    oneDNN's bf16 GEMM reorders a plain weight into that layout on every call, which for one decode row costs
    more than the product: packed once (torch.ops.mkldnn._reorder_linear_weight), a one-row product is 1.6-1.8x
    faster (AMD EPYC with AVX512-BF16, 2026-12-05, 576- and 1536-wide demo layers and a 49152 x 576 head; on
    that CPU torch.mv's bf16 GEMV, faster on an earlier Intel Xeon, was 2x slower than plain F.linear).
    Linears that share an input are packed side by side: one call instead of two or three. The packed copy is
    the engine's own: the borrowed modules keep their weights (one more copy of the dense weights in memory)
    unless the engine owns the model (`Transformer.release_packed_sources`).
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sources = tuple(linears)  # a tuple: not submodules (their dense weights are not this module's state)
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # blocked for one-row products
        biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=weight.dtype)
                  for lin in linears]
        self.bias = torch.cat([b.detach() for b in biases]) if any(lin.bias is not None for lin in linears) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _plain(linear: nn.Module) -> bool:
    # our own canonical-strides pre-hook (qwen_quant.workarounds) changes no values: PackedLinear reads 2-D anyway
    return (type(linear) is nn.Linear and "forward" not in vars(linear) and not linear._forward_hooks
            and all(is_canonical_input_hook(h) for h in linear._forward_pre_hooks.values()))


def packable(*linears: nn.Module) -> bool:
    """Plain bf16 nn.Linears on a CPU whose oneDNN computes bf16 natively: what PackedLinear takes."""
    return (all(_plain(lin) and lin.weight.device.type == "cpu" and lin.weight.dtype == torch.bfloat16
                for lin in linears) and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def for_decode(*linears: nn.Module) -> nn.Module:
    """Borrowed linears that read the same input as the engine calls them: one PackedLinear where that is faster
    (plain bf16 nn.Linears on the CPU), else the one linear unchanged (fp32/fp16, QuantLinear, a GPU, a module
    with hooks). Several linears are only ever given when they can be packed together."""
    if packable(*linears):
        return PackedLinear(list(linears))
    if len(linears) != 1:
        raise ValueError("several linears are packed together or not at all")
    return linears[0]


@dataclasses.dataclass
class Positions:
    """Where the T tokens of one forward pass sit, shared by every layer (built once per pass)."""

    cos: torch.Tensor  # [T, rope_dims] rows of the rope tables (sin likewise)
    sin: torch.Tensor
    q_scale: torch.Tensor | None  # [1, 1, T, 1] Qwen v1 log-n scaling, or None
    index: int | torch.Tensor  # the first position (an int), or the positions [T] on the device
    kv_len: int  # cache positions attention reads
    mask: torch.Tensor | None  # [T, kv_len] bool (device positions) or None
    causal: bool  # causal within the T tokens (an int start of 0, T > 1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, *, qkv: nn.Module | None = None, q: nn.Module | None = None,
                 k: nn.Module | None = None, v: nn.Module | None = None, o: nn.Module,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        if (qkv is None) == (q is None):
            raise ValueError("give either a fused qkv projection or q, k and v")
        self.args = args
        self.qkv, self.q_proj, self.k_proj, self.v_proj, self.o_proj = qkv, q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.split = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        self.gqa = args.n_kv_heads != args.n_heads
        self.kv_cache = None  # set by Transformer.setup_caches

    def _project(self, x: torch.Tensor):
        if self.qkv is not None:
            return self.qkv(x).split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, p: Positions, ops: Ops) -> torch.Tensor:
        a = self.args
        B, T, _ = x.shape
        q, k, v = self._project(x)
        q = q.view(B, T, a.n_heads, a.head_dim)
        k = k.view(B, T, a.n_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rope(q.transpose(1, 2), k.transpose(1, 2), p.cos, p.sin, a.rope_dims, p.q_scale)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        keys, values = self.kv_cache.update(p.index, k, v, p.kv_len)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=p.mask, is_causal=p.causal,
                                           enable_gqa=self.gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Qwen v1 names them w2 (gate) and w1 (up). `gate_up`, when given,
    computes both in one product (gate's rows first): gate and up are then None."""

    def __init__(self, gate: nn.Module | None, up: nn.Module | None, down: nn.Module,
                 gate_up: nn.Module | None = None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.gate_up = gate, up, down, gate_up

    def forward(self, x, ops: Ops = EAGER_OPS):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(ops.silu_mul(gate, up))
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: FeedForward):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x, h, p: Positions, ops: Ops):
        """x: the residual stream; h: attn_norm(x), computed by the caller together with the previous
        residual add. Returns (x + attention, mlp output): the caller adds the mlp output together with
        the next norm, so each residual add and the norm after it are one fused op."""
        attn = self.attn(h, p, ops)
        x, h = ops.add_norm(x, attn, self.mlp_norm.weight, self.mlp_norm.eps)
        return x, self.mlp(h, ops)


def _released(module, args):
    raise RuntimeError("this linear's weights were handed to the fast engine (owns_model=True): run the engine, "
                       "or build it with owns_model=False to keep using the model itself")


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, embed: nn.Module, blocks: list[Block], norm: RMSNorm,
                 lm_head: nn.Module, inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        self.args = args
        self.embed, self.blocks, self.norm, self.lm_head = embed, nn.ModuleList(blocks), norm, lm_head
        # the norm that follows each block: the next block's attn_norm, the final norm after the last
        self._next_norms = [b.attn_norm for b in blocks[1:]] + [norm]  # a plain list: already submodules
        self.inv_freq = inv_freq.float().cpu()
        self.rope_scaling = rope_scaling
        self.max_seq_len = 0
        self.cos = self.sin = self.q_scale = None
        self.decode_ops = EAGER_OPS  # compiled_ops() on a GPU: see Ops

    def release_packed_sources(self) -> int:
        """For an engine that owns its model (nothing else will run the borrowed modules): drop the dense weights
        that PackedLinears were packed from, keeping any the engine still reads itself (a head tied to the
        embeddings). The borrowed modules are left with meta weights and a pre-hook that raises, so a later use
        fails with a clear error instead of returning meta tensors. Returns the bytes released: on Qwen2.5-1.5B in
        BF16 every linear's dense copy (3.6 GB) and, for an Int4 checkpoint, its 16-bit lm_head (0.47 GB)."""
        kept = {t.data_ptr() for t in (*self.embed.parameters(), *self.norm.parameters())}
        freed = 0
        for packed in (m for m in self.modules() if isinstance(m, PackedLinear)):
            for lin in packed.sources:
                w = lin.weight
                if w.device.type == "meta" or w.data_ptr() in kept:
                    continue
                freed += w.numel() * w.element_size()
                lin.weight = nn.Parameter(w.detach().to("meta"), requires_grad=False)
                lin.register_forward_pre_hook(_released)
            packed.sources = ()
        return freed

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def setup_caches(self, batch_size: int, max_seq_len: int, kv_cache: str = "auto") -> None:
        """Preallocate the KV cache and the rope tables for `max_seq_len` positions."""
        from qwen_quant.engine.kv_cache import make_kv_cache

        a = self.args
        for block in self.blocks:
            block.attn.kv_cache = None  # free the old cache before allocating the new one
        for block in self.blocks:
            block.attn.kv_cache = make_kv_cache(kv_cache, batch_size, a.n_kv_heads, max_seq_len, a.head_dim,
                                                self.dtype, self.device)
        self.max_seq_len, self.batch_size, self.kv_kind = max_seq_len, batch_size, kv_cache
        self.set_rope(1.0)
        self.q_scale = logn_scales(a.logn_seq_length, max_seq_len, self.dtype, self.device)

    def set_rope(self, ntk_alpha: float) -> None:
        """(Re)fill the cos/sin tables in place, so captured graphs keep reading the same buffers.
        sin has its first half negated: apply_rope needs no negation per step."""
        inv_freq = self.inv_freq
        if ntk_alpha != 1.0:  # Qwen v1 dynamic NTK: a larger base for prompts past its training length
            d = self.args.rope_dims
            base = self.args.rope_base * ntk_alpha ** (d / (d - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        pos = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.cat((-torch.ones_like(freqs[0]), torch.ones_like(freqs[0])))
        cos = (emb.cos() * self.rope_scaling).to(self.device, self.dtype)
        sin = (emb.sin() * self.rope_scaling * sign).to(self.device, self.dtype)
        if self.cos is None or self.cos.shape != cos.shape:
            self.cos, self.sin = cos, sin
        else:
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        self.ntk_alpha = ntk_alpha

    def positions(self, T: int, input_pos: int | torch.Tensor, kv_len: int | None) -> Positions:
        """The rope rows, cache range and mask for T tokens at input_pos (see the module docstring)."""
        if isinstance(input_pos, int):
            end = input_pos + T
            if kv_len is not None and kv_len != end:
                raise ValueError(f"with a host position, attention reads exactly {end} positions, not {kv_len}")
            rows, kv_len, mask = slice(input_pos, end), end, None
            causal = T > 1 and input_pos == 0  # the prompt: SDPA's own causal masking
            if T > 1 and input_pos > 0:  # a chunk after earlier tokens: causal, offset by input_pos
                mask = causal_mask(torch.arange(input_pos, end, device=self.cos.device), end)
        else:
            if kv_len is None:
                raise ValueError("positions given as a tensor need kv_len (the cache length read)")
            rows, causal, mask = input_pos, False, causal_mask(input_pos, kv_len)
        q_scale = None if self.q_scale is None else self.q_scale[rows].view(1, 1, -1, 1)
        return Positions(self.cos[rows], self.sin[rows], q_scale, input_pos, kv_len, mask, causal)

    def forward(self, input_ids: torch.Tensor, input_pos: int | torch.Tensor, kv_len: int | None = None,
                last_only: bool = True) -> torch.Tensor:
        """input_ids [B, T] at input_pos (an int: the first of T positions; or a LongTensor [T] on the
        device, read up to kv_len) -> logits [B, V] (last position) or [B, T, V]."""
        T = input_ids.shape[1]
        ops = self.decode_ops if T == 1 else EAGER_OPS
        p = self.positions(T, input_pos, kv_len)
        x = self.embed(input_ids)
        h = self.blocks[0].attn_norm(x)
        for block, norm in zip(self.blocks, self._next_norms):
            x, delta = block(x, h, p, ops)
            x, h = ops.add_norm(x, delta, norm.weight, norm.eps)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        return logits[:, -1] if last_only else logits


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[T, kv_len] bool: the query at position p sees cache slots 0..p (slots past kv_len are not even read)."""
    return torch.arange(kv_len, device=positions.device) <= positions[:, None]


def logn_scales(seq_length: int | None, max_seq_len: int, dtype, device) -> torch.Tensor | None:
    """Qwen v1 use_logn_attn: the query at position p is scaled by log_{seq_length}(p + 1) past seq_length."""
    if not seq_length or max_seq_len <= seq_length:
        return None
    n = torch.arange(1, max_seq_len + 1, dtype=torch.float64)
    scale = torch.where(n > seq_length, torch.log(n) / math.log(seq_length), torch.ones_like(n))
    return scale.to(device, dtype)


def ntk_alpha_for(prompt_len: int, seq_length: int | None) -> float:
    """Qwen v1's dynamic-NTK alpha for a prompt of prompt_len tokens (1 within its training length)."""
    if not seq_length or prompt_len <= seq_length:
        return 1.0
    context = math.log(prompt_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context) - 1, 1.0)
