"""QuantLinear: a GPTQ-packed linear layer whose buffers are the checkpoint tensors.

Buffers carry the checkpoint names (qweight, qzeros, scales, g_idx, bias), so `state_dict()` IS the
checkpoint layout (v1 "gptq" or "gptq_v2" zeros, as loaded). `set_backend()` repacks ONCE for the
chosen backend(s); backend tensors live in `self._plan`, outside the state dict.

Memory decision: the checkpoint buffers are kept by default (saving must reproduce the checkpoint).
The torch backend and the Triton backend without act-order read them in place, so nothing is
duplicated there. Backends that re-lay weights (CPU, CUDA C++, Triton with act-order) hold a second
packed copy; `set_backend(..., keep_checkpoint=False)` frees the buffers the plan does not use
(the module can then no longer be saved or re-prepared).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.kernels import backends
from qwen_quant.kernels import format as fmt


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, dtype: torch.dtype = torch.float16, checkpoint_format: str = "gptq",
                 device=None):
        super().__init__()
        if bits not in fmt.SUPPORTED_BITS:
            raise UserError(f"unsupported bits={bits}; use one of {fmt.SUPPORTED_BITS}")
        if group_size != -1 and group_size <= 0:
            raise UserError(f"group_size={group_size} is invalid; use -1 or a positive integer")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise UserError(f"checkpoint_format {checkpoint_format!r} is not supported; use 'gptq' or 'gptq_v2'")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        groups = fmt.num_groups(in_features, group_size)
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features * bits / 32), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, math.ceil(out_features * bits / 32), **i32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", fmt.default_g_idx(in_features, group_size).to(device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend_name = "auto"  # requested name; the plan below says what actually runs
        self._plan: list = []  # [(max_rows or None, backend name, backend module, state)]
        self._checkpoint_dropped = False

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_quant(cls, codes, scales, zeros, g_idx, bias, bits: int, group_size: int,
                   checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """From unpacked quantizer output: codes [K, N], scales [G, N], true zeros [G, N], g_idx [K]."""
        k, n = codes.shape
        layer = cls(k, n, bits, group_size, bias is not None, dtype, checkpoint_format)
        v1 = checkpoint_format == "gptq"
        if v1 and bool((zeros == 0).any()):
            raise UserError("a zero point of 0 cannot be stored in the v1 'gptq' format; use checkpoint_format='gptq_v2'")
        layer.qweight.copy_(fmt.pack_qweight(codes, bits))
        layer.qzeros.copy_(fmt.pack_qzeros(zeros, bits, v1=v1))
        layer.scales.copy_(scales.to(dtype))
        layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.to(dtype))
        return layer.to(codes.device)

    @classmethod
    def random(cls, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
               bias: bool = False, dtype: torch.dtype = torch.float16, device="cpu",
               checkpoint_format: str = "gptq") -> "QuantLinear":
        """Random codes in the real layout (speed/memory runs), made directly on `device` (meta works)."""
        layer = cls(in_features, out_features, bits, group_size, bias, dtype, checkpoint_format, device=device)
        if torch.device(device).type == "meta":
            return layer
        with torch.no_grad():
            # every int32 is a valid word of random codes
            layer.qweight.copy_(torch.randint(-2**31, 2**31, layer.qweight.shape, dtype=torch.int32, device=device))
            # symmetric zero 2^(b-1); one 32-value bit-stream block of it, tiled along N
            zero = torch.full((1, 32), 2 ** (bits - 1), dtype=torch.int32)
            block = fmt.pack_qzeros(zero, bits, v1=checkpoint_format == "gptq").to(device)
            reps = math.ceil(layer.qzeros.shape[1] / block.shape[1])
            layer.qzeros.copy_(block.repeat(layer.qzeros.shape[0], reps)[:, : layer.qzeros.shape[1]])
            # weights with std ~0.02 (codes uniform over 2^b levels)
            base = 0.035 / 2 ** (bits - 1)
            layer.scales.copy_(base * (0.75 + 0.5 * torch.rand(layer.scales.shape, device=device)))
            if bias:
                layer.bias.normal_(0.0, 0.02)
        return layer

    # ---- backends -----------------------------------------------------------------------------
    @property
    def desc_act(self) -> bool:
        return bool((self.g_idx[1:] < self.g_idx[:-1]).any()) if self.g_idx.numel() > 1 else False

    @property
    def backend(self) -> str:
        """What runs, e.g. 'torch' or 'cuda<=16,triton'."""
        return ",".join(name if rows is None else f"{name}<={rows}" for rows, name, _, _ in self._plan) or "unprepared"

    def set_backend(self, name: str = "auto", keep_checkpoint: bool = True) -> "QuantLinear":
        """Choose the backend(s) for this layer and repack once."""
        if self._checkpoint_dropped:
            raise UserError("this layer's checkpoint buffers were freed (keep_checkpoint=False); reload the model to change backend")
        if self.qweight.device.type == "meta":
            raise UserError("QuantLinear is still on the meta device; load its tensors before choosing a backend")
        desc_act = self.desc_act
        plan = backends.select_backend(name, self.qweight.device, self.in_features, self.out_features,
                                       self.bits, self.group_size, desc_act)
        try:
            prepared = [(rows, backend, backends.backend_module(backend), self._prepare(backend)) for rows, backend in plan]
        except ValueError as exc:  # a layout a repacking backend cannot take (e.g. irregular act-order groups)
            if name != "auto":
                raise UserError(f"backend {name!r} cannot take this layer ({exc}); use --backend auto") from None
            prepared = [(None, "torch", backends.backend_module("torch"), self._prepare("torch"))]
        if prepared[-1][0] is not None:  # always end with an any-size entry
            prepared.append((None, "torch", backends.backend_module("torch"), self._prepare("torch")))
        self._plan, self.backend_name = prepared, name
        if not keep_checkpoint:
            self._drop_unused_buffers()
        return self

    def _prepare(self, backend: str):
        # every backend's prepare takes v1= (False: gptq_v2 true zeros)
        module = backends.backend_module(backend)
        return module.prepare(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size,
                              v1=self.checkpoint_format == "gptq")

    def _drop_unused_buffers(self) -> None:
        used = {id(t) for *_, state in self._plan
                for t in (state.values() if isinstance(state, dict) else vars(state).values())
                if isinstance(t, torch.Tensor)}
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if id(getattr(self, name)) not in used:
                setattr(self, name, getattr(self, name).new_empty(0))
        self._checkpoint_dropped = True

    # ---- nn.Module plumbing -------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # a device/dtype move invalidates prepared tensors: re-prepare lazily at the next forward
        result = super()._apply(fn, *args, **kwargs)
        self._plan = []
        return result

    def __getstate__(self):
        # deepcopy/pickle: a plan entry names its backend module instead of holding it (modules do not pickle)
        state = self.__dict__.copy()
        state["_plan"] = [(rows, name, None, prepared) for rows, name, _, prepared in self._plan]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = [(rows, name, backends.backend_module(name), prepared) for rows, name, _, prepared in self._plan]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._plan = []

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._checkpoint_dropped:
            raise UserError("cannot save a QuantLinear whose checkpoint buffers were freed (keep_checkpoint=False)")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}, "
                f"backend={self.backend}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plan:
            self.set_backend(self.backend_name)
        x2d = x.reshape(-1, self.in_features)
        rows = x2d.shape[0]
        half = x2d.dtype in (torch.float16, torch.bfloat16)
        for max_rows, name, module, state in self._plan:
            if name == "cuda" and not half:  # the CUDA C++ kernel takes 16-bit activations only
                continue
            if max_rows is None or rows <= max_rows:
                y = module.matmul(x2d, state)
                break
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)
