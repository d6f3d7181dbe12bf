"""The block-by-block GPTQ pipeline (the error-propagating form of the GPTQ paper).

The inputs of decoder block 0 are captured once. Then, per block: for each true-sequential step of
the layout, run the block with hooks on that step's linears to accumulate their Hessians (padding
masked out), quantize them and put the quantized weights in; finally recompute the block's outputs
with its quantized weights, which become the next block's inputs. Only one block sits on the device
at a time; a safetensors folder is streamed block by block (`StreamingModel`), so host RAM holds one
block, not the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.host_memory import keep_large_buffers_mapped, release_freed_memory
from qwen_quant.kernels.format import pack_qweight, pack_qzeros
from qwen_quant.quantize import equalize, gptq
from qwen_quant.models.layouts import Layout, blocks_of
from qwen_quant.quantize.settings import OPT_IN_RUN_SETTINGS, SHRINK_AUTO, QuantSettings  # noqa: F401 (re-exported)

# Test hook: stop (as if interrupted) right after block k has been quantized and its state saved.
STOP_AFTER_BLOCK_ENV = "QWEN_QUANT_STOP_AFTER_BLOCK"


class StoppedForTest(KeyboardInterrupt):
    """Raised by the STOP_AFTER_BLOCK_ENV hook: behaves like Ctrl-C (state is kept for --resume)."""


@dataclasses.dataclass
class LayerStats:
    name: str
    in_features: int
    out_features: int
    rel_error: float  # ||W X - Q X|| / ||W X|| on the calibration inputs (X as the quantized model sees them)
    damp_used: float
    fallback: str | None
    seconds: float  # its share (by output rows) of the quantization of its step's stacked linears
    # HessianAccumulator.input_peak of its inputs, and QuantSettings.layer_method: "rtn-massive" where
    # --rtn-massive rounded it to nearest for that (None: a record written before these fields)
    input_peak: float | None = None
    method: str | None = None
    shrink: float | None = None  # the --shrink GPTQ used on its Hessian (auto: this layer's intensity)
    # --awq-scales: the alpha of its input channels' scales (None where no scaling won the search) and what they did
    # to the round-to-nearest output error on the calibration inputs it searched on (with / without; all of them, or
    # those --awq-drop-massive kept); both None: not in a group
    awq_alpha: float | None = None
    awq_error_ratio: float | None = None
    awq_dropped_tokens: int | None = None  # --awq-drop-massive: calibration tokens its group's search left out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def checkpoint_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """16-bit tensors keep the model's 16-bit dtype; fp32 models are written as fp16."""
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


# ---------------------------------------------------------------- model sources, one block at a time

class InMemoryModel:
    """A model already in host (or device) memory: blocks move to the device one at a time."""

    def __init__(self, model: nn.Module, layout: Layout):
        self.model, self.layout = model, layout
        self.blocks = blocks_of(model, layout)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self._home = next(model.parameters()).device

    def prepare_capture(self, device) -> None:
        """Everything but the blocks goes to the device for the block-0 capture."""
        if str(device) != str(self._home):
            for name, child in self._non_block_modules():
                child.to(device)

    def _non_block_modules(self):
        # the top modules that are not the block list nor one of its ancestors
        block_path = self.layout.blocks
        out = []

        def walk(mod, prefix):
            for name, child in mod.named_children():
                full = f"{prefix}{name}"
                if full == block_path:
                    continue
                if block_path.startswith(full + "."):
                    walk(child, full + ".")
                else:
                    out.append((full, child))
        walk(self.model, "")
        return out

    def finish_capture(self) -> None:
        for _, child in self._non_block_modules():
            child.to(self._home)

    def load_block(self, i: int, device) -> nn.Module:
        return self.blocks[i].to(device)

    def release_block(self, i: int, block: nn.Module) -> None:
        block.to(self._home)

    def load_head(self, device) -> tuple[nn.Module, torch.Tensor]:
        """(final norm on the device, lm_head weight [vocab, hidden]) for quantizing the head."""
        return (self.model.get_submodule(self.layout.final_norm).to(device),
                self.model.get_submodule(self.layout.lm_head).weight.detach())

    def release_head(self) -> None:
        self.model.get_submodule(self.layout.final_norm).to(self._home)

    def non_block_tensors(self) -> list[tuple[str, Callable[[], torch.Tensor], tuple, torch.dtype]]:
        """(name, load, shape, dtype) of every saved tensor outside the blocks; tied copies once."""
        prefix = self.layout.blocks + "."
        seen, out = set(), []
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name.startswith(prefix):
                continue
            key = (t.data_ptr(), tuple(t.shape))
            if key in seen:  # tied lm_head / embeddings: saved once, as save_pretrained does
                continue
            seen.add(key)
            out.append((name, (lambda t=t: t.detach()), tuple(t.shape), t.dtype))
        return out

    def config_dict(self) -> dict:
        return self.model.config.to_dict()


class StreamingModel:
    """A model read block by block: skeleton on the meta device, one block's tensors in RAM.

    The tensors come from a safetensors folder (read with plain file reads, no mmap, so pages of the shards
    never count towards this process's resident memory) or, for a synthetic model, are made when read
    (models.synthetic.SyntheticTensors): either way host RAM holds one block, not the model.
    """

    def __init__(self, folder: Path, trust_remote_code: bool = False, tensors=None, config=None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from qwen_quant.models.layouts import layout_for
        from qwen_quant.quantize.writer import SafetensorsFolder

        self.folder = Path(folder) if folder is not None else None
        self.files = tensors if tensors is not None else SafetensorsFolder(self.folder)
        self.dtype = self.files.float_dtype()
        if config is None:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        self.config = config
        # buffers (rotary inv_freq) are real, parameters are meta: nothing big is allocated
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                          dtype=self.dtype)
        self.model.eval()
        self.layout = layout_for(self.model)
        self.blocks = blocks_of(self.model, self.layout)

    def _materialize(self, module: nn.Module, prefix: str, device, skip: tuple[str, ...] = ()) -> None:
        for name, p in list(module.named_parameters()):
            full = prefix + name
            if any(full == s or full.startswith(s + ".") for s in skip):
                continue
            t = self.files.read(full).to(device=device, dtype=self.dtype if p.is_floating_point() else p.dtype)
            _set_tensor(module, name, nn.Parameter(t, requires_grad=False))
        for name, b in list(module.named_buffers()):
            _set_tensor(module, name, b.to(device), buffer=True)

    def prepare_capture(self, device) -> None:
        # embeddings, rotary and final norm on the device; blocks stay meta (the capture stops
        # before block 0 runs) and lm_head is never reached
        self._materialize(self.model, "", device, skip=(self.layout.blocks, self.layout.lm_head))

    def finish_capture(self) -> None:
        for name, p in list(self.model.named_parameters()):
            if not name.startswith(self.layout.blocks + ".") and p.device.type != "meta":
                _set_tensor(self.model, name, nn.Parameter(p.to("meta"), requires_grad=False))

    def load_block(self, i: int, device) -> nn.Module:
        block = self.blocks[i]
        self._materialize(block, f"{self.layout.blocks}.{i}.", device)
        return block

    def release_block(self, i: int, block: nn.Module) -> None:
        for name, p in list(block.named_parameters()):
            _set_tensor(block, name, nn.Parameter(p.to("meta"), requires_grad=False))

    def load_head(self, device) -> tuple[nn.Module, torch.Tensor]:
        norm = self.model.get_submodule(self.layout.final_norm)
        self._materialize(norm, self.layout.final_norm + ".", device)
        names = set(self.files.names())
        head = f"{self.layout.lm_head}.weight"
        return norm, self.files.read(head if head in names else f"{self.layout.embed}.weight")  # tied: the embeddings

    def release_head(self) -> None:
        self.release_block(-1, self.model.get_submodule(self.layout.final_norm))

    def non_block_tensors(self):
        prefix = self.layout.blocks + "."
        out = []
        for name in self.files.names():
            if name.startswith(prefix):
                continue
            shape, dtype = self.files.shape_dtype(name)
            out.append((name, (lambda n=name: self.files.read(n)), shape, dtype))
        return out

    @classmethod
    def synthetic(cls, shape: str, seed: int = 0) -> "StreamingModel":
        """synthetic:<shape> streamed: its random tensors are made block by block, as they are needed."""
        from qwen_quant.models.synthetic import SyntheticTensors, synthetic_config

        return cls(None, tensors=SyntheticTensors(shape, seed=seed), config=synthetic_config(shape))

    def config_dict(self) -> dict:
        if self.folder is None:
            return self.config.to_dict()
        return json.loads((self.folder / "config.json").read_text())


def _set_tensor(root: nn.Module, dotted: str, value, buffer: bool = False) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = value


# ---------------------------------------------------------------- capture and block runs

class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (nothing after it is needed)."""


@dataclasses.dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # per calibration sample [1, L, H] on the device
    args: list[tuple]  # extra positional arguments of the block call (Qwen v1 passes some)
    kwargs: list[dict]  # attention mask, position embeddings/ids ... as the model passed them
    token_mask: torch.Tensor  # [n, L] bool, True where a real (non-padding) token is
    autocast: torch.dtype | None = None  # run blocks under autocast to this dtype (see QuantSettings.forward_dtype)
    # asymmetric calibration only: the same samples' hidden states in the full-precision model
    fp_hidden: list[torch.Tensor] | None = None

    def run(self, block: nn.Module, i: int, fp: bool = False) -> torch.Tensor:
        """Block `block` on sample i: the quantized model's stream, or with fp=True the fp model's."""
        hidden = (self.fp_hidden if fp else self.hidden)[i]
        with torch.autocast(hidden.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = block(hidden, *self.args[i], **self.kwargs[i])
        return out[0] if isinstance(out, (tuple, list)) else out


def forward_autocast(settings: QuantSettings, model_dtype: torch.dtype, device="cpu") -> torch.dtype | None:
    """The autocast dtype of the calibration forwards, or None to run them in the model's dtype.

    "auto" only picks bf16 where the hardware computes it natively (a CPU without AVX512-BF16/AMX
    would emulate it, slower than fp32)."""
    if settings.forward_dtype == "bf16":
        return torch.bfloat16
    if settings.forward_dtype == "auto" and model_dtype == torch.float32 and native_bf16(torch.device(device)):
        return torch.bfloat16
    return None


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(source, calib, device) -> BlockInputs:
    """Run each calibration sample up to decoder block 0 and keep exactly what the block receives."""
    first = source.blocks[0]
    hidden, args, kwargs = [], [], []

    def grab(_module, a, kw):
        kw = dict(kw)
        if "hidden_states" in kw:
            h, rest = kw.pop("hidden_states"), a
        else:
            h, rest = a[0], a[1:]
        hidden.append(h.to(device))
        args.append(_to_device(tuple(rest), device))
        kwargs.append(_to_device(kw, device))
        raise _StopForward

    source.prepare_capture(device)
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(calib.input_ids.shape[0]):
            ids = calib.input_ids[i:i + 1].to(device)
            mask = calib.attention_mask[i:i + 1].to(device)
            try:
                source.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError("the model never called decoder block 0: the layout does not match this model")
    finally:
        handle.remove()
        source.finish_capture()
    return BlockInputs(hidden, args, kwargs, calib.attention_mask.to(device).bool())


def _input_of(block: nn.Module, name: str, inputs: BlockInputs, i: int, fp: bool = False) -> torch.Tensor:
    """What linear `name` of `block` receives on sample i (the forward stops right there)."""
    seen = []

    def hook(_module, a):
        seen.append(a[0].detach())
        raise _StopForward

    handle = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        inputs.run(block, i, fp=fp)
    except _StopForward:
        return seen[0]
    finally:
        handle.remove()
    raise RuntimeError(f"{name} never ran in the block's forward: fix the layout")


@torch.no_grad()
def collect_hessian(block: nn.Module, inputs: BlockInputs, linears: dict[str, nn.Module],
                    fp_block: nn.Module | None = None, spread: bool = False) -> gptq.HessianAccumulator:
    """The accumulated Hessian shared by a step's linears (they see the same input, by the layout's definition).

    Only the step's first linear is hooked, and the forward stops right there: nothing after it is needed.
    With `fp_block` (the block's unquantized copy: asymmetric calibration) the same linear's inputs in the fp model
    are read too, into a `gptq.AsymmetricAccumulator`; `spread` keeps what `shrinkage` needs.
    """
    first_name, first = next(iter(linears.items()))
    if len({lin.in_features for lin in linears.values()}) != 1:
        raise RuntimeError(f"the linears of step {list(linears)} have different inputs: fix the layout")
    kind = gptq.AsymmetricAccumulator if fp_block is not None else gptq.HessianAccumulator
    acc = kind(first.in_features, spread=spread)
    for i in range(len(inputs.hidden)):
        mask = inputs.token_mask[i:i + 1]
        x = _input_of(block, first_name, inputs, i)
        if fp_block is None:
            acc.add_batch(x, mask=mask)
        else:
            acc.add_pair(x, _input_of(fp_block, first_name, inputs, i, fp=True), mask=mask)
    return acc


def shrink_for(settings: QuantSettings, acc: gptq.HessianAccumulator) -> float:
    """The shrink GPTQ applies to one layer's Hessian: --shrink's number, or with auto the layer's own Ledoit-Wolf
    intensity from its calibration samples (the accumulator must have been made with spread=True)."""
    return acc.shrinkage() if settings.shrink == SHRINK_AUTO else float(settings.shrink)


def relative_output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, rows: int = 1024) -> float:
    """||W X - Q X|| / ||W X|| from H = 2 X X^T / n (the factor cancels): no extra forward needed."""
    return _error_ratio(*output_error_terms(w, q, h, rows))


def output_error_terms(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, rows: int = 1024) -> tuple[float, float]:
    """(||W X - Q X||^2, ||W X||^2) up to H's factor: sums over row slices add up to the whole layer's.

    Row chunks keep the temporaries small; sums are accumulated in float64."""
    h = h.float()
    num = den = 0.0
    for i in range(0, w.shape[0], rows):
        wi = w[i:i + rows].float()
        di = wi - q[i:i + rows].float()
        num += float(((di @ h) * di).sum(dtype=torch.float64))
        den += float(((wi @ h) * wi).sum(dtype=torch.float64))
    return num, den


def _error_ratio(num: float, den: float) -> float:
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def quantize_weight(w: torch.Tensor, h: torch.Tensor, settings: QuantSettings, damp: float | None = None,
                    method: str | None = None, shrink: float = 0.0):
    """w [N, K] float32 (possibly the asymmetric target rather than the layer's own weights); damp defaults
    to settings.damp (the pipeline passes settings.damp_for the layer's calibration tokens), method to the run's
    (the pipeline passes settings.layer_method: --rtn-massive may round a layer of a GPTQ run to nearest), shrink
    is the layer's (`shrink_for`)."""
    if (method or settings.method) != "gptq":
        return gptq.rtn_quantize(w, settings.bits, settings.group_size, settings.sym, mse=settings.mse)
    result = gptq.gptq_quantize(w, h, bits=settings.bits, group_size=settings.group_size, sym=settings.sym,
                                desc_act=settings.desc_act, static_groups=settings.static_groups,
                                damp=settings.damp if damp is None else damp, mse=settings.mse, shrink=shrink,
                                group_aware=settings.act_group_aware)
    if settings.refit_scales and result.fallback is None:
        result = gptq.refit_scales(w, h, result)
    return result


def block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


@torch.no_grad()
def quantize_block(block: nn.Module, inputs: BlockInputs, layout: Layout, settings: QuantSettings,
                   on_layer: Callable[[str], None] | None = None,
                   fp_block: nn.Module | None = None) -> tuple[dict, list[LayerStats]]:
    """Quantize one block in place, step by step; return {linear name: QuantResult} and stats.

    fp_block, the block's unquantized copy, turns on asymmetric calibration (settings.gptaq_alpha)."""
    results, stats = {}, []
    for step in layout.steps:
        linears = {name: block.get_submodule(name) for name in step}
        acc = collect_hessian(block, inputs, linears, fp_block=fp_block, spread=settings.shrink == SHRINK_AUTO)
        h = acc.hessian().to(block_device(block))
        d = acc.asymmetry() if fp_block is not None else None
        tokens, peak = acc.tokens, acc.input_peak()
        damp, shrink = settings.damp_for(h.shape[0], tokens), shrink_for(settings, acc)
        method = settings.layer_method(peak, h.shape[0], tokens)
        del acc
        # The step's linears share H, and GPTQ treats each output row on its own given H: quantizing
        # their weights stacked along the output dimension is exactly quantizing each alone, with one
        # Cholesky and one column loop instead of several (q/k/v: 3x fewer Python-level steps).
        weights = [lin.weight.detach().float() for lin in linears.values()]
        target = torch.cat(weights)
        if d is not None and method == "gptq":  # round-to-nearest keeps the layer's own weights
            target = gptq.asymmetric_target(target, h, d, settings.gptaq_alpha, damp, shrink)
        del d
        pieces = quantize_weight(target, h, settings, damp, method, shrink).split([w.shape[0] for w in weights])
        del target
        for (name, lin), w, res in zip(linears.items(), weights, pieces):
            q = res.weight.to(lin.weight.device)
            err = relative_output_error(w, q, h)
            lin.weight.data.copy_(q.to(lin.weight.dtype))
            del q
            res.weight = None  # the checkpoint needs codes/scales/zeros only: don't hold a float copy per linear
            results[name] = res
            stats.append(LayerStats(name, lin.in_features, lin.out_features, err, float(res.damp_used),
                                    res.fallback, res.seconds, round(peak, 3), method,
                                    float(shrink) if method == "gptq" else None))
            if on_layer:
                on_layer(name)
    return results, stats


@torch.no_grad()
def equalize_block(block: nn.Module, inputs: BlockInputs, layout: Layout, settings: QuantSettings) -> dict:
    """--awq-scales: search and fold each scale group's channel scales (quantize/equalize.py) into the block, still
    in full precision; {linear name: (alpha, error ratio, tokens left out)}. One pass over the samples collects every
    group's input statistics: folding one group leaves every other group's inputs as they were (the function is
    unchanged, and down_proj's inputs change only by its own group's scales, which the search accounts for).
    --awq-drop-massive leaves each sample's massive tokens out of these statistics (not out of GPTQ's)."""
    groups = equalize.scale_groups(layout, block)
    accs = [gptq.HessianAccumulator(block.get_submodule(g.linears[0]).in_features) for g in groups]
    mask = []

    def hook_for(acc):
        return lambda _module, a: acc.add_batch(a[0].detach(), mask=mask[0], drop_above=settings.awq_drop_massive)

    handles = [block.get_submodule(g.linears[0]).register_forward_pre_hook(hook_for(acc))
               for g, acc in zip(groups, accs)]
    try:
        for i in range(len(inputs.hidden)):
            mask[:] = [inputs.token_mask[i:i + 1]]
            inputs.run(block, i)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for group, acc in zip(groups, accs):
        weights = [block.get_submodule(name).weight.detach() for name in group.linears]
        s, alpha, ratio = equalize.search_scales(weights, acc.hessian(), acc.mean_abs(), settings.bits,
                                                 settings.group_size, settings.sym)
        equalize.fold(block, group, s)
        found |= {name: (alpha, ratio, acc.dropped if settings.awq_drop_massive else None) for name in group.linears}
    return found


@torch.no_grad()
def propagate(block: nn.Module, inputs: BlockInputs, fp_block: nn.Module | None = None) -> None:
    """The next block's inputs: this block's outputs with its quantized weights (and, for asymmetric
    calibration, the fp model's: the unquantized copy on the fp stream)."""
    inputs.hidden = [inputs.run(block, i) for i in range(len(inputs.hidden))]
    if fp_block is not None:
        inputs.fp_hidden = [inputs.run(fp_block, i, fp=True) for i in range(len(inputs.fp_hidden))]


def start_fp_stream(inputs: BlockInputs, settings: QuantSettings) -> None:
    """Asymmetric calibration follows the fp model's activations too; block 0 sees the same in both models."""
    if settings.method == "gptq" and settings.gptaq_alpha > 0:
        inputs.fp_hidden = list(inputs.hidden)


@torch.no_grad()
def quantize_and_propagate(block: nn.Module, inputs: BlockInputs, layout: Layout, settings: QuantSettings,
                           on_layer: Callable[[str], None] | None = None) -> tuple[dict, list[LayerStats]]:
    """One block's whole turn: quantize it in place, then move both streams past it (the quantized model's
    and, with asymmetric calibration, the fp model's through an unquantized copy of the block)."""
    scaled = equalize_block(block, inputs, layout, settings) if settings.awq_scales else {}
    fp_block = copy.deepcopy(block) if inputs.fp_hidden is not None else None  # one block's weights
    results, stats = quantize_block(block, inputs, layout, settings, on_layer=on_layer, fp_block=fp_block)
    for s in stats:
        s.awq_alpha, s.awq_error_ratio, s.awq_dropped_tokens = scaled.get(s.name, (None, None, None))
    propagate(block, inputs, fp_block)
    return results, stats


def block_checkpoint_tensors(block: nn.Module, prefix: str, results: dict, settings: QuantSettings,
                             out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one block (host memory): GPTQ tensors for its linears, 16-bit rest."""
    out = {}
    for name, t in block.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in results:
            continue
        t = t.detach().to("cpu")
        out[prefix + name] = t.to(out_dtype) if t.is_floating_point() else t.clone()
    for name, res in results.items():
        out.update(gptq_tensors(f"{prefix}{name}", res, settings.bits, getattr(block.get_submodule(name), "bias", None)))
    return dict(sorted(out.items()))


def gptq_tensors(prefix: str, res, bits: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One quantized linear's checkpoint tensors (FORMAT.md: GPTQ v1, fp16 scales)."""
    out = {f"{prefix}.qweight": pack_qweight(res.codes.cpu(), bits),
           f"{prefix}.qzeros": pack_qzeros(res.zeros.cpu(), bits, v1=True),
           f"{prefix}.scales": res.scales.detach().cpu().to(torch.float16),
           f"{prefix}.g_idx": res.g_idx.detach().cpu().to(torch.int32)}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().cpu().to(torch.float16)
    return out


# Output rows of the head quantized at a time: GPTQ treats each row on its own given H, so slices give exactly
# the whole layer's result while float32 temporaries stay ~50 MB (Qwen's 151,936 x 1,536 head is 0.9 GB in fp32).
# Each slice is packed before the next one starts (its int32 codes would be another 0.9 GB): a multiple of 32 rows,
# so every bit width's qzeros words hold whole slices.
HEAD_ROWS = 8192


@torch.no_grad()
def quantize_head(source, inputs: BlockInputs, settings: QuantSettings, device) -> tuple[dict, LayerStats]:
    """The output head, after the last block (--lm-head): its input is the final norm of the last block's outputs
    on the quantized model's stream; its Hessian is collected like any layer's, its rows quantized in slices.
    Returns (checkpoint tensors, stats)."""
    norm, weight = source.load_head(device)
    name = source.layout.lm_head
    t0 = time.perf_counter()
    acc = gptq.HessianAccumulator(weight.shape[1], spread=settings.shrink == SHRINK_AUTO)
    for i, hidden in enumerate(inputs.hidden):
        acc.add_batch(norm(hidden), mask=inputs.token_mask[i:i + 1])
    source.release_head()
    h = acc.hessian().to(device)
    damp, peak, shrink = settings.damp_for(h.shape[0], acc.tokens), acc.input_peak(), shrink_for(settings, acc)
    method = settings.layer_method(peak, h.shape[0], acc.tokens)
    del acc
    slices, num, den = [], 0.0, 0.0
    for start in range(0, weight.shape[0], HEAD_ROWS):
        w = weight[start:start + HEAD_ROWS].to(device=device, dtype=torch.float32)
        res = quantize_weight(w, h, settings, damp, method, shrink)
        n, d = output_error_terms(w, res.weight, h)
        num, den = num + n, den + d
        slices.append(gptq_tensors(name, res, settings.bits))
    tensors = {key: slices[0][key] if key.endswith(".g_idx") else torch.cat([s[key] for s in slices], dim=1)
               for key in slices[0]}
    stats = LayerStats(name, weight.shape[1], weight.shape[0], _error_ratio(num, den), float(res.damp_used),
                       res.fallback, time.perf_counter() - t0, round(peak, 3), method,
                       float(shrink) if method == "gptq" else None)
    return tensors, stats


def check_packable(source, settings: QuantSettings) -> None:
    """Every quantized linear's sizes must fit the packed layout (before any work is done)."""
    k_unit = 32 if settings.bits == 3 else 32 // settings.bits
    n_unit = 32 if settings.bits == 3 else 32 // settings.bits
    linears = [(name, source.blocks[0].get_submodule(name)) for name in source.layout.linear_names]
    if settings.lm_head:
        if source.layout.fallback:
            raise UserError(f"--lm-head needs the model's final norm and head, which the generic layout of "
                            f"{source.layout.name} does not name: add a layout to models/layouts.py or drop --lm-head")
        linears.append((source.layout.lm_head, source.model.get_submodule(source.layout.lm_head)))
    for name, lin in linears:
        if lin.in_features % k_unit or lin.out_features % n_unit:
            raise UserError(f"{name} is {lin.in_features}x{lin.out_features}: {settings.bits}-bit GPTQ packing needs "
                            f"in_features % {k_unit} == 0 and out_features % {n_unit} == 0; try --bits 4")


def stop_after_block() -> int | None:
    v = os.environ.get(STOP_AFTER_BLOCK_ENV, "")
    return int(v) if v.strip() else None


def run_blocks(source, calib, settings: QuantSettings, device, state, progress) -> list[LayerStats]:
    """Quantize every block (skipping those `state` already finished); block tensors go to `state`."""
    keep_large_buffers_mapped()  # else host RSS creeps up block after block (qwen_quant.host_memory)
    layout, n_blocks = source.layout, len(source.blocks)
    out_dtype = checkpoint_dtype(source.dtype)
    inputs = capture_block_inputs(source, calib, device)
    inputs.autocast = forward_autocast(settings, source.dtype, device)
    start_fp_stream(inputs, settings)
    start = state.first_unfinished()
    if start > 0:
        inputs.hidden, fp_hidden = state.load_inputs(device)
        if inputs.fp_hidden is not None:
            inputs.fp_hidden = fp_hidden
        progress.resumed(start, n_blocks)
    stop_at = stop_after_block()
    all_stats = [s for i in range(start) for s in state.block_stats(i)]
    progress.start(n_blocks, start, len(layout.linear_names))
    for i in range(start, n_blocks):
        t0 = time.perf_counter()
        block = source.load_block(i, device)
        results, stats = quantize_and_propagate(block, inputs, layout, settings, on_layer=progress.layer_done)
        tensors = block_checkpoint_tensors(block, f"{layout.blocks}.{i}.", results, settings, out_dtype)
        del results
        source.release_block(i, block)
        for s in stats:
            s.name = f"{layout.blocks}.{i}.{s.name}"
        state.save_block(i, tensors, [s.to_dict() for s in stats], inputs.hidden, last=(i == n_blocks - 1),
                         fp_inputs=inputs.fp_hidden)
        all_stats.extend(stats)
        release_freed_memory()
        progress.block_done(i, stats, time.perf_counter() - t0)
        if stop_at is not None and i == stop_at and i < n_blocks - 1:
            raise StoppedForTest(f"stopped after block {i} ({STOP_AFTER_BLOCK_ENV})")
    if settings.lm_head:  # in the same run as the last block: its outputs are the head's inputs
        progress.layer_done(source.layout.lm_head)
        tensors, stats = quantize_head(source, inputs, settings, device)
        state.save_head(tensors, stats.to_dict())
        all_stats.append(stats)
        progress.head_done(stats)
    progress.close()
    return all_stats
