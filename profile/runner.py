"""Run every cell in its own fresh subprocess and collect results.json as cells finish.

The parent never touches CUDA: each cell (and the one bandwidth probe) runs in a new Python
process, so one cell's allocator cache, fragmentation or OOM cannot leak into the next. After
each cell results.json is rewritten atomically, so Ctrl-C (or a crash) keeps what finished.
A results.json already in the output folder is added to: cells it holds (measured, OOM or failed)
are not run again, so a stopped run resumes, and several runs (in the order the most valuable cells
should land) build one table. Each run's environment and command are kept under "runs".
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qwen_quant.profile.cells import CELL_FIELDS, Cell, empty_result
from qwen_quant.profile.roofline import roofline
from qwen_quant.errors import UserError
from qwen_quant.files import write_text_atomic

# Test hook: QWEN_QUANT_PROFILE_INJECT="oom@<text>" (or "error@<text>") makes every cell whose name
# contains <text> fail that way inside its subprocess, after the model is built.
INJECT_ENV = "QWEN_QUANT_PROFILE_INJECT"
_WORKER = "from qwen_quant.profile.runner import worker_main; worker_main()"


@dataclasses.dataclass
class RunOptions:
    device: str = "cpu"
    warmup: int = 1
    repeat: int = 3
    gen_repeat: int | None = None  # timed runs of generate cells (None: `repeat`); long generations are costly
    max_memory_gib: float | None = None
    kv_cache: str = "auto"
    cell_timeout_s: float | None = None
    seed: int = 0
    quiet: bool = False
    threads: int | None = None  # CPU threads per cell (None: torch's default, all cores)


# ------------------------------------------------------------------ parent side

def run_profile(cells: list[Cell], out_dir: Path, options: RunOptions, env: dict) -> dict:
    """Measure the bandwidth once, then each cell in a fresh subprocess; returns the results dict."""
    from tqdm import tqdm

    out_dir = Path(out_dir).resolve()  # workers run with the job folder as cwd: paths must be absolute
    work = out_dir / "cells"
    work.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = _earlier_results(path, env) or {"env": env, "bandwidth": None, "cells": [], "details": [],
                                               "plan": [], "interrupted": False, "runs": []}
    results.setdefault("runs", []).append({k: env.get(k) for k in ("date", "command", "commit")})
    done = {_cell_key(c) for c in results["cells"]}
    results["plan"] += [c.to_dict() for c in cells if _cell_key(c.to_dict()) not in
                        {_cell_key(p) for p in results["plan"]}]
    skipped = [c for c in cells if _cell_key(c.to_dict()) in done]
    cells = [c for c in cells if _cell_key(c.to_dict()) not in done]
    if skipped:  # said even with --quiet: a run that measures less than asked must say why
        print(f"{len(skipped)} cell(s) already in {path}: not run again", file=sys.stderr)

    def save():
        write_text_atomic(path, json.dumps(results, indent=1, allow_nan=False))

    try:
        if results["bandwidth"] is None:  # once per folder: every roofline of one table shares it
            results["bandwidth"] = measure_bandwidth(options, work)
            results["env"].update((results["bandwidth"] or {}).pop("env", {}) or {})
        results["interrupted"] = False
        save()
        bar = tqdm(cells, desc="profile", unit="cell", disable=options.quiet, dynamic_ncols=True)
        for cell in bar:
            bar.set_postfix_str(cell.name)
            row, details = run_cell(cell, options, work / f"{len(results['cells']):02d}-{cell.name}")
            bw = (results["bandwidth"] or {}).get("bandwidth_gbps")
            details.update(roofline(details.get("bytes_per_token"), row["decode_tokens_per_s"], bw))
            row["roofline_pct"] = details.pop("roofline_pct")
            results["cells"].append(row)
            results["details"].append(details)
            save()
            if not options.quiet:
                tqdm.write(_one_line(cell, row))
    except KeyboardInterrupt:
        results["interrupted"] = True
        save()
        raise
    return results


def _cell_key(c: dict) -> tuple:
    """What makes a cell the same cell: a planned Cell (its label) and a result row (model = that label) alike."""
    return (c.get("label") or c.get("model"),) + tuple(c.get(k) for k in (
        "precision", "engine", "backend", "scenario", "context_tokens", "new_tokens")) + (c.get("batch") or 1,)


def _earlier_results(path: Path, env: dict) -> dict | None:
    """The results.json a run adds to, when the folder holds one from the same device; else None."""
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): move it away or choose another --out") from None
    device = lambda e: (e.get("gpu"), e.get("gpu_count")) if e.get("gpu") else (e.get("cpu"), e.get("cpu_count"))  # noqa: E731
    if device(earlier.get("env", {})) != device(env):
        raise UserError(f"{path} was measured on {device(earlier.get('env', {}))[0]}, this run is on "
                        f"{device(env)[0]}: one table is one machine, choose another --out")
    return earlier


def measure_bandwidth(options: RunOptions, work: Path) -> dict | None:
    """The copy bandwidth, once per run: in a subprocess on a GPU (the parent never touches CUDA),
    in this process on the CPU (nothing to isolate there, and it saves an interpreter start)."""
    if options.device.startswith("cuda"):
        job = {"job": "bandwidth", "device": options.device, "threads": options.threads}
        return _run_job(job, work / "bandwidth", options.cell_timeout_s).get("bandwidth")
    return _bandwidth_job("cpu", options.threads)


def _one_line(cell: Cell, row: dict) -> str:
    if row["status"] != "ok":
        return f"{cell.name}: {row['status'].upper()} {row['error'] or ''}".rstrip()
    speed = f"{row['tokens_per_s']:.2f} tok/s"
    if row["decode_tokens_per_s"]:
        speed += f", decode {row['decode_tokens_per_s']:.2f} tok/s"
    return f"{cell.name}: {speed}, prefill {row['prefill_s']:.3f} s"


def run_cell(cell: Cell, options: RunOptions, stem: Path) -> tuple[dict, dict]:
    """One cell in a fresh subprocess -> (row with CELL_FIELDS, details)."""
    job = {"job": "cell", "cell": cell.to_dict(), "options": dataclasses.asdict(options)}
    out = _run_job(job, stem, options.cell_timeout_s)
    if "row" in out:
        return out["row"], out["details"]
    status, error = out.get("status", "error"), out.get("error", "the cell produced no result")
    return empty_result(cell, status, error), {"cell": cell.name, "log": str(stem) + ".log"}


def _run_job(job: dict, stem: Path, timeout_s: float | None) -> dict:
    """Run one job in a fresh interpreter; its stdout/stderr go to <stem>.log."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = (Path(f"{stem}{ext}") for ext in (".job.json", ".result.json", ".log"))
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        # cwd is the job folder (holds no `profile/` that would shadow the standard library)
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(job_path), str(result_path)],
                                cwd=str(stem.parent), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return {"status": "error", "error": f"timed out after {timeout_s:g} s (--cell-timeout)"}
        except KeyboardInterrupt:
            _stop(proc)
            raise
    if result_path.is_file():
        return json.loads(result_path.read_text())
    if code in (-9, 137):  # SIGKILL: almost always the kernel's OOM killer
        return {"status": "oom", "error": "killed by SIGKILL (out of host memory?)"}
    return {"status": "error", "error": f"exit code {code}: {_last_line(log_path)}"}


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------ subprocess side

def worker_main() -> None:
    """Entry point of a job subprocess: argv = job.json result.json."""
    job_path, result_path = sys.argv[1], sys.argv[2]
    job = json.loads(Path(job_path).read_text())
    if job["job"] == "bandwidth":
        out = {"bandwidth": _bandwidth_job(job["device"], job.get("threads"))}
    else:
        out = _cell_job(Cell.from_dict(job["cell"]), RunOptions(**job["options"]))
    write_text_atomic(Path(result_path), json.dumps(out, allow_nan=False))


def _bandwidth_job(device: str, threads: int | None) -> dict:
    import torch

    from qwen_quant.profile.roofline import measure_copy_bandwidth

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with torch.no_grad():
        result = measure_copy_bandwidth(device)
    torch.set_num_threads(previous)
    if device.startswith("cuda"):
        result["env"] = {"gpu": torch.cuda.get_device_name(), "cuda_runtime": torch.version.cuda}
    return result


def _cell_job(cell: Cell, options: RunOptions) -> dict:
    import traceback

    from qwen_quant.profile.memory import is_out_of_memory

    try:
        row, details = measure_cell(cell, options)
        return {"row": row, "details": details}
    except Exception as e:  # one cell's failure is a result, not the end of the run
        traceback.print_exc()
        status = "oom" if is_out_of_memory(e) else "error"
        message = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return {"status": status, "error": f"{type(e).__name__}: {message}"}


def _inject_failure(cell: Cell) -> None:
    spec = os.environ.get(INJECT_ENV, "")
    kind, _, text = spec.partition("@")
    if not text or text not in cell.name:
        return
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected out-of-memory ({INJECT_ENV})")
    raise RuntimeError(f"injected failure ({INJECT_ENV})")


def measure_cell(cell: Cell, options: RunOptions) -> tuple[dict, dict]:
    """Build the model, warm up, run the timed repeats under the memory probe, summarize."""
    import torch
    import transformers  # noqa: F401  (libraries load before the memory cap: a cell runs out of memory on its
    #                                   tensors, never on mapping a shared library)

    from qwen_quant.engine import make_engine, total_seconds
    from qwen_quant.profile.memory import MemoryProbe, apply_memory_cap
    from qwen_quant.profile.models import build_model, resolve_model

    torch.manual_seed(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = options.device
    apply_memory_cap(device, options.max_memory_gib)
    t0 = time.perf_counter()
    model = build_model(resolve_model(cell.model), cell.precision, device, cell.backend, seed=options.seed)
    build_s = time.perf_counter() - t0
    _inject_failure(cell)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the build's temporaries must not count as this cell's reserved memory
    engine = make_engine(cell.engine, model, cell.context_tokens + cell.new_tokens, device, options.kv_cache,
                         cell.batch, owns_model=True)  # a cell's model serves its engine only
    input_ids = _input_ids(model, cell, options.seed)

    warm_new = 1 if cell.scenario == "encode" else min(cell.new_tokens, 16)
    for _ in range(options.warmup):  # same shapes, short: kernels chosen, caches allocated
        engine.timed_generate(input_ids, warm_new)

    probe = MemoryProbe(device).start()
    repeat = options.gen_repeat if cell.scenario == "generate" and options.gen_repeat else options.repeat
    runs = [engine.timed_generate(input_ids, cell.new_tokens) for _ in range(repeat)]
    memory = probe.stop()

    for r in runs:
        if tuple(r["tokens"].shape) != (cell.batch, cell.new_tokens):
            raise RuntimeError(f"engine returned {tuple(r['tokens'].shape)} tokens, "
                               f"expected {(cell.batch, cell.new_tokens)}")
    summary = _summarize(cell, runs, total_seconds)
    details = {"cell": cell.name, "build_s": build_s, "cpu_threads": torch.get_num_threads(),
               **_byte_counts(model, cell), "nvml_scope": memory.pop("nvml_scope"),
               "tokens_generated": [int(r["tokens"].shape[1]) for r in runs], **summary.pop("details")}
    row = {k: None for k in CELL_FIELDS}
    row.update(model=cell.label, precision=cell.precision, engine=cell.engine, backend=cell.backend,
               scenario=cell.scenario, context_tokens=cell.context_tokens, new_tokens=cell.new_tokens,
               repeats=len(runs), status="ok", error=None, **memory, **summary)
    return row, details


def _byte_counts(model, cell: Cell) -> dict:
    """Weights (resident, and read per decode step), KV cache per position and at the end, bytes/token."""
    import torch

    from qwen_quant.profile.models import model_dtype
    from qwen_quant.profile.roofline import (decode_bytes_per_token, decode_weight_bytes, kv_bytes_per_position,
                                             weight_bytes)

    dtype = model_dtype(model)
    kv_pos = kv_bytes_per_position(model.config, torch.tensor([], dtype=dtype).element_size(), cell.batch)
    dec_weights = decode_weight_bytes(model)
    return {
        "dtype": str(dtype).replace("torch.", ""), "backend_used": _backends_used(model),
        "weight_bytes": weight_bytes(model), "decode_weight_bytes": dec_weights, "kv_bytes_per_position": kv_pos,
        "kv_bytes_final": kv_pos * (cell.context_tokens + cell.new_tokens),
        "bytes_per_token": (decode_bytes_per_token(dec_weights, kv_pos, cell.context_tokens, cell.new_tokens)
                            if cell.new_tokens >= 2 else None),
    }


def _summarize(cell: Cell, runs: list[dict], total_seconds) -> dict:
    """Median over repeats, min/max spread of the headline tokens/s, and the median run's token trace."""
    totals = [total_seconds(r) for r in runs]
    prefills = [float(r["prefill_s"]) for r in runs]
    tokens = cell.batch * cell.new_tokens
    if cell.scenario == "encode":  # prompt-processing rate: context tokens per second of prefill
        speeds = [cell.batch * cell.context_tokens / p for p in prefills]
    else:  # the seed's definition: new tokens / total generate time
        speeds = [tokens / t for t in totals]
    decode = [cell.batch * len(r["token_s"]) / sum(r["token_s"])
              for r in runs if r["token_s"] and sum(r["token_s"]) > 0]
    median_run = runs[sorted(range(len(runs)), key=lambda i: totals[i])[len(runs) // 2]]
    return {
        "tokens_per_s": statistics.median(speeds),
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "prefill_s": statistics.median(prefills),
        "spread": {"min": min(speeds), "max": max(speeds)},
        "details": {"runs": [{"total_s": t, "prefill_s": p, "tokens_per_s": v}
                             for t, p, v in zip(totals, prefills, speeds)],
                    "token_latency_s": [float(x) for x in median_run["token_s"]]},
    }


def _input_ids(model, cell: Cell, seed: int):
    """Fixed random prompt ids (ordinary tokens: ids below 10% of the vocab avoid special tokens at the end)."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 32000))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab // 10), (cell.batch, cell.context_tokens), generator=gen)


def _backends_used(model) -> list[str] | None:
    names = {getattr(m, "backend", None) for m in model.modules() if type(m).__name__ == "QuantLinear"}
    names.discard(None)
    return sorted(map(str, names)) or None
