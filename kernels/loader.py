"""load_quantized: a GPTQ checkpoint (ours, AutoGPTQ, GPTQModel, Qwen's published Int4) -> a transformers
model whose quantized linears are QuantLinear modules, ready for generate().

How: read `quantization_config` (config.json, else quantize_config.json); build the model skeleton
from its config with parameters on the meta device (buffers such as rotary tables are computed for
real); swap every linear that has a `.qweight` in the checkpoint for a QuantLinear; stream the
safetensors tensors (single file or sharded via the index; never pickle) into place one at a time;
tie embeddings when the config says so; validate every quantized layer; choose backends once.

Default dtype (for the 16-bit tensors: embeddings, norms, lm_head, activations): float16 on a GPU
(what GPTQ checkpoints store), bfloat16 on the CPU (the CPU backend's int4 kernel takes BF16
activations; CPU fp16 matmuls are slow). Scales and biases keep their checkpoint dtype.

keep_checkpoint=False frees each layer's checkpoint tensors as soon as its backend has repacked them
(inference only: the model can no longer be saved); peak memory is then the packed model plus one layer.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.host_memory import release_freed_memory
from qwen_quant.workarounds import canonical_lm_head_input
from qwen_quant.kernels import format as fmt
from qwen_quant.kernels.quant_linear import QuantLinear

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local folder, or a hub id's files (qwen_quant.hub: downloaded once into the HF cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file; pass the checkpoint folder (with config.json and *.safetensors)")
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise UserError(f"no checkpoint folder at {text}; pass a folder or a hub id like Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4")
    from qwen_quant.hub import snapshot

    return snapshot(text)


def read_quant_config(folder: Path) -> fmt.QuantConfig:
    config = _read_json(folder / "config.json")
    qdict = config.get("quantization_config")
    if not qdict and (folder / "quantize_config.json").exists():
        qdict = _read_json(folder / "quantize_config.json")
    if not qdict:
        raise fmt.FormatError(f"{folder} has no quantization_config in config.json and no quantize_config.json: "
                              f"not a GPTQ checkpoint (load full-precision models with qwen-quantize/load_model)")
    return fmt.QuantConfig.from_dict(qdict)


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if not names or missing:
            raise fmt.FormatError(f"{index.name} lists missing shards ({', '.join(missing[:3]) or 'none listed'}); re-download the checkpoint")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise fmt.FormatError(f"{folder} has only pickle weights (.bin/.pt), which are never loaded; convert them to safetensors")
    raise fmt.FormatError(f"{folder} has no *.safetensors weights")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing; pass a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fmt.FormatError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); re-download it") from None


@contextlib.contextmanager
def parameters_on_meta():
    """Create modules with their parameters on the meta device but buffers (rotary tables) for real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise UserError(f"{folder} needs its own modeling code; pass trust_remote_code=True (--trust-remote-code) if you trust it") from None
        raise UserError(f"cannot read the model config in {folder}: {str(exc).splitlines()[0]}") from None
    # we replace the linears ourselves: keep transformers' own GPTQ integration out of the way
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return model


def _quantized_prefixes(names) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def _swap_in_quant_linears(model: nn.Module, prefixes, shapes: dict, qcfg: fmt.QuantConfig) -> None:
    for prefix in prefixes:
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise fmt.FormatError(f"checkpoint has {prefix}.qweight but the model has no module {prefix}: "
                                  f"config.json does not match the weights") from None
        k = getattr(old, "in_features", None)
        n = getattr(old, "out_features", None)
        if k is None or n is None:
            raise fmt.FormatError(f"{prefix} is a {type(old).__name__}, not a linear layer; cannot hold GPTQ tensors")
        has_bias = f"{prefix}.bias" in shapes
        layer = QuantLinear(k, n, qcfg.bits, qcfg.group_size, bias=has_bias, checkpoint_format=qcfg.checkpoint_format,
                            device="meta")
        for name in QUANT_TENSORS:
            buf = getattr(layer, name)
            key = f"{prefix}.{name}"
            if name == "g_idx" and key not in shapes:
                continue  # old checkpoints without act-order omit g_idx: the default is right
            if buf is not None and key in shapes and tuple(shapes[key]) != tuple(buf.shape):
                raise fmt.FormatError(f"{key} has shape {tuple(shapes[key])}, expected {tuple(buf.shape)} for a "
                                      f"{k}->{n} layer with bits={qcfg.bits}, group_size={qcfg.group_size}: checkpoint is inconsistent")
            if buf is not None and key not in shapes:
                raise fmt.FormatError(f"{key} is missing from the checkpoint: it is incomplete")
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _tensor_shapes(files) -> dict:
    """Tensor name -> shape, read from the safetensors headers only (no data)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = handle.get_slice(name).get_shape()
        except Exception as exc:
            raise fmt.FormatError(f"{f.name} is not a readable safetensors file ({type(exc).__name__}); re-download it") from None
    return shapes


def _place(model: nn.Module, name: str, tensor: torch.Tensor, device, dtype) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if isinstance(module, QuantLinear) and attr in QUANT_TENSORS:
        module._buffers[attr] = tensor.to(device)
        return True
    if attr in module._parameters:
        value = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        return True
    if attr in module._buffers:
        module._buffers[attr] = tensor.to(device)
        return True
    return False


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path: Path):
    """(name, tensor) for each tensor of a safetensors file, each read into its own memory.

    Not safe_open's mmap: a tensor it returns keeps the whole file mapped, and every page read stays in the
    process's resident set (a 1.6 GB checkpoint held 1.6 GB beside the model it loaded)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise fmt.FormatError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which this loader does not read")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise fmt.FormatError(f"{path.name} is cut short (tensor {name}); re-download it")
            yield name, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _load_tensors(model, files, device, dtype, on_layer_loaded=None) -> None:
    """Place every tensor; `on_layer_loaded(name, layer)` runs as soon as a QuantLinear has all its tensors, so
    a backend can repack it (and free the checkpoint copy) before the next layer is read."""
    unexpected = []
    waiting = {name: layer for name, layer in model.named_modules() if isinstance(layer, QuantLinear)}
    for f in files:
        for name, tensor in read_tensors(f):
            if not _place(model, name, tensor, device, dtype):
                unexpected.append(name)
                continue
            prefix = name.rpartition(".")[0]
            layer = waiting.get(prefix)
            if layer is not None and on_layer_loaded is not None and _complete(layer):
                on_layer_loaded(prefix, waiting.pop(prefix))
    unexpected = [n for n in unexpected if not n.endswith("inv_freq")]
    if unexpected:
        warnings.warn(f"{len(unexpected)} checkpoint tensors have no place in the model and were ignored "
                      f"(first: {unexpected[0]})", stacklevel=3)
    for prefix, layer in waiting.items():  # layers whose g_idx the checkpoint omits: complete once defaults are in
        _default_g_idx(layer, device)
        if on_layer_loaded is not None and _complete(layer):
            on_layer_loaded(prefix, layer)


def _complete(layer: QuantLinear) -> bool:
    return all(t is None or t.device.type != "meta" for t in (layer.qweight, layer.qzeros, layer.scales,
                                                               layer.g_idx, layer.bias))


def _default_g_idx(layer: QuantLinear, device) -> None:
    if layer.g_idx.device.type == "meta":  # old checkpoints without act-order omit g_idx: the default is right
        layer._buffers["g_idx"] = fmt.default_g_idx(layer.in_features, layer.group_size).to(device)


def _finish(model, device, dtype) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise fmt.FormatError(f"the checkpoint lacks {len(missing)} weights the model needs (first: {missing[0]}): it is incomplete")
    for module in model.modules():  # buffers computed at init (rotary tables) follow the model
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device) and not isinstance(module, QuantLinear):
                module._buffers[key] = buf.to(device)


def _validate_layer(name: str, layer: QuantLinear) -> None:
    k, n = fmt.check_layer_tensors(name, layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                   layer.bits, layer.group_size)
    if (k, n) != (layer.in_features, layer.out_features):
        raise fmt.FormatError(f"{name}: tensors describe a {k}->{n} layer, the model a "
                              f"{layer.in_features}->{layer.out_features} one: checkpoint is inconsistent")
    if layer.scales.shape[0] != fmt.num_groups(k, layer.group_size):
        raise fmt.FormatError(f"{name}: {layer.scales.shape[0]} groups of scales, expected "
                              f"{fmt.num_groups(k, layer.group_size)}: checkpoint is inconsistent")


def load_quantized(path_or_id, backend: str = "auto", device="cpu", dtype=None, trust_remote_code: bool = False,
                   keep_checkpoint: bool = True):
    """Load a GPTQ checkpoint as a transformers model with QuantLinear layers (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use device='cpu'")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    folder = resolve_checkpoint(path_or_id)
    qcfg = read_quant_config(folder)
    files = shard_files(folder)
    shapes = _tensor_shapes(files)
    prefixes = _quantized_prefixes(shapes)
    if not prefixes:
        raise fmt.FormatError(f"{folder} declares GPTQ but has no *.qweight tensors: not a GPTQ checkpoint")
    model = build_skeleton(folder, dtype, trust_remote_code)
    _swap_in_quant_linears(model, prefixes, shapes, qcfg)

    def ready(name: str, layer: QuantLinear) -> None:  # each layer checked and repacked as soon as it is read
        _validate_layer(name, layer)
        layer.set_backend(backend, keep_checkpoint=keep_checkpoint)

    _load_tensors(model, files, device, dtype, on_layer_loaded=ready)
    _finish(model, device, dtype)
    release_freed_memory()
    _attach_generation_config(model, folder)
    return canonical_lm_head_input(model.eval())


def _attach_generation_config(model, folder: Path) -> None:
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(folder)
