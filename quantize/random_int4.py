"""Synthetic Int4: every layout linear of a model becomes a QuantLinear with random codes.

For speed/memory runs at real shapes (qwen-profile's synthetic int4): the quantized layers are
created directly on the target device in the packed layout, so a 7B model whose linears sit on the
meta device never materializes its 16-bit weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.kernels.quant_linear import QuantLinear
from qwen_quant.quantize.layouts import blocks_of, layout_for


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's real (non-meta) tensors live; cpu when everything is still meta."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def replace_with_random_quant(model: nn.Module, bits: int = 4, group_size: int = 128, backend: str = "auto",
                              device=None, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Swap every layout linear for QuantLinear.random (same shapes and bias); returns the model."""
    device = torch.device(device) if device is not None else _model_device(model)
    layout = layout_for(model)
    for block in blocks_of(model, layout):
        for name in layout.linear_names:
            old = block.get_submodule(name)
            if isinstance(old, QuantLinear):
                continue
            if not isinstance(old, nn.Linear):
                raise UserError(f"{name} is a {type(old).__name__}, not nn.Linear; cannot make it a random Int4 layer")
            new = QuantLinear.random(old.in_features, old.out_features, bits=bits, group_size=group_size,
                                     bias=old.bias is not None, dtype=dtype, device=device)
            new.set_backend(backend)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new)
    return model
