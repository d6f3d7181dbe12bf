"""Tables from a results.json, in the seed's shapes: speed.md, memory.md, details.csv.

`render_tables(results)` is the one entry point (qwen-report reuses it). Rows are model x precision
(x engine when not `hf`); columns follow the lengths measured. A cell that ran out of memory shows
"OOM", one that failed "error", one never measured "not measured" — never a zero.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from qwen_quant.files import write_text_atomic
from qwen_quant.profile.cells import CELL_FIELDS

SEED_LABEL = "seed A100 (AutoGPTQ, HF generate)"
# SEED.md: one A100-SXM4-80G, tokens/s generating N tokens from a 1-token context.
SEED_SPEED = {
    ("7b", "bf16"): {2048: 30.34, 8192: 29.32}, ("7b", "int4"): {2048: 43.56, 8192: 33.92},
    ("14b", "bf16"): {2048: 30.70, 8192: 21.73}, ("14b", "int4"): {2048: 37.11, 8192: 26.11},
}
# SEED.md peak memory; printed there as "GB" but read from max_memory_allocated()/2**30, i.e. GiB.
SEED_MEMORY = {
    ("7b", "bf16"): {("encode", 2048): 17.66, ("generate", 8192): 22.58},
    ("7b", "int4"): {("encode", 2048): 8.21, ("generate", 8192): 13.62},
    ("14b", "bf16"): {("encode", 2048): 30.15, ("generate", 8192): 38.94},
    ("14b", "int4"): {("encode", 2048): 13.00, ("generate", 8192): 21.79},
}
PRECISION_NAMES = {"bf16": "BF16", "fp16": "FP16", "fp32": "FP32", "int4": "Int4"}
STATUS_TEXT = {"oom": "OOM", "error": "error"}
NOT_MEASURED = "not measured"


def load_results(results) -> dict:
    if isinstance(results, (str, Path)):
        return json.loads(Path(results).read_text())
    return results


def seed_model_size(label: str) -> str | None:
    """'7b' / '14b' for Qwen-7B/14B(-Chat), their Int4 checkpoints and synthetic shapes; else None."""
    name = label.lower().removeprefix("synthetic-").removeprefix("synthetic:")
    m = re.match(r"qwen-(7|14)b(-|$)", name)
    return f"{m.group(1)}b" if m else None


# ------------------------------------------------------------------ table model

def row_key(c: dict) -> tuple:
    return (c["model"], c["precision"], c["engine"])


def row_label(key: tuple) -> str:
    model, precision, engine = key
    text = f"{model} {PRECISION_NAMES.get(precision, precision)}"
    return text if engine == "hf" else f"{text} ({engine} engine)"


def _planned(results: dict) -> list[dict]:
    """Cells that were measured plus cells that were planned but never ran (interrupted run)."""
    rows = list(results.get("cells", []))
    done = {(row_key(c), c["scenario"], c["context_tokens"], c["new_tokens"]) for c in rows}
    for p in results.get("plan", []):
        p = dict(p, model=p.get("label", p["model"]))
        if (row_key(p), p["scenario"], p["context_tokens"], p["new_tokens"]) not in done:
            rows.append({**{k: None for k in CELL_FIELDS}, **{k: p[k] for k in (
                "model", "precision", "engine", "backend", "scenario", "context_tokens", "new_tokens")},
                "status": None})
    return rows


def _seed_shaped(c: dict) -> bool:
    """The seed's tables hold encode cells and generate cells from a 1-token context only; a generate
    cell with a long context (decode speed at depth) appears in the per-cell table, not there."""
    return c["scenario"] == "encode" or (c.get("context_tokens") or 1) <= 1


def _columns(rows: list[dict]):
    encode = sorted({c["context_tokens"] for c in rows if c["scenario"] == "encode"})
    gens = sorted({c["new_tokens"] for c in rows if c["scenario"] == "generate" and _seed_shaped(c)})
    return encode, gens


def _find(rows, key, scenario, length):
    for c in rows:
        if row_key(c) == key and c["scenario"] == scenario and _seed_shaped(c) and \
                (c["context_tokens"] if scenario == "encode" else c["new_tokens"]) == length:
            return c
    return None


def scenario_label(c: dict) -> str:
    if c["scenario"] == "encode":
        return f"encode {c['context_tokens']}"
    ctx = c.get("context_tokens") or 1
    return f"generate {c['new_tokens']}" + (f" after a {ctx}-token context" if ctx > 1 else "")


def _status_text(c: dict | None) -> str | None:
    if c is None or c.get("status") is None:
        return NOT_MEASURED
    return STATUS_TEXT.get(c["status"])


def _speed_text(c: dict | None) -> str:
    text = _status_text(c)
    if text:
        return text
    spread = c.get("spread") or {}
    if (c.get("repeats") or 1) > 1 and spread.get("min") is not None:
        return f"{c['tokens_per_s']:.2f} ({spread['min']:.2f}–{spread['max']:.2f})"
    return f"{c['tokens_per_s']:.2f}"


def _peak_gib(c: dict) -> tuple[float | None, str]:
    """The table's memory number: allocator peak on a GPU, RSS on the CPU."""
    if c.get("peak_allocated_gib") is not None:
        return c["peak_allocated_gib"], "allocated"
    return c.get("peak_rss_gib"), "RSS"


def _memory_text(c: dict | None) -> str:
    text = _status_text(c)
    if text:
        return text
    value, _ = _peak_gib(c)
    return NOT_MEASURED if value is None else f"{value:.2f} GiB"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _row_keys(rows):
    return list(dict.fromkeys(row_key(c) for c in rows))


# ------------------------------------------------------------------ the tables

def speed_table(results: dict) -> str:
    rows = _planned(results)
    _, gens = _columns(rows)
    keys = _row_keys(rows)
    seed_cols = [g for g in gens if g in (2048, 8192)
                 and any(SEED_SPEED.get((seed_model_size(k[0]), k[1])) for k in keys)]
    header = ["Model"] + [f"Speed ({g} tokens)" for g in gens] + [f"{SEED_LABEL}, {g} tokens" for g in seed_cols]
    body = []
    for key in keys:
        seed = SEED_SPEED.get((seed_model_size(key[0]), key[1]), {}) if key[2] == "hf" else {}
        body.append([row_label(key)] + [_speed_text(_find(rows, key, "generate", g)) for g in gens]
                    + [f"{seed[g]:.2f}" if g in seed else "—" for g in seed_cols])
    return _markdown(header, body)


def memory_table(results: dict) -> str:
    rows = _planned(results)
    encode, gens = _columns(rows)
    keys = _row_keys(rows)
    cols = [("encode", n) for n in encode] + [("generate", n) for n in gens]
    seed_cols = [col for col in cols if any(col in SEED_MEMORY.get((seed_model_size(k[0]), k[1]), {}) for k in keys)]

    def title(col):
        return f"Peak Usage for {'Encoding' if col[0] == 'encode' else 'Generating'} {col[1]} Tokens"

    header = ["Model"] + [title(c) for c in cols] + [f"{SEED_LABEL}, {title(c)[15:].lower()}" for c in seed_cols]
    body = []
    for key in keys:
        seed = SEED_MEMORY.get((seed_model_size(key[0]), key[1]), {}) if key[2] == "hf" else {}
        body.append([row_label(key)] + [_memory_text(_find(rows, key, *c)) for c in cols]
                    + [f"{seed[c]:.2f} GiB" if c in seed else "—" for c in seed_cols])
    return _markdown(header, body)


def _fmt(v, digits=2, unit=""):
    return "—" if v is None else f"{v:.{digits}f}{unit}"


def decode_detail_table(results: dict) -> str:
    """Per cell: tokens/s, decode-only tokens/s, prefill, achieved GB/s and % of roofline (flagged > 100 %)."""
    details = results.get("details", [])
    header = ["Model", "Scenario", "Backend", "Tokens/s (median)", "Spread (min–max)", "Decode-only tokens/s",
              "Prefill (s)", "Achieved GB/s", "% of roofline", "Repeats"]
    body = []
    for i, c in enumerate(results.get("cells", [])):
        d = details[i] if i < len(details) else {}
        scen = scenario_label(c)
        if c["status"] != "ok":
            body.append([row_label(row_key(c)), scen, c["backend"], STATUS_TEXT[c["status"]]] + ["—"] * 5
                        + [str(c.get("repeats") or "—")])
            continue
        pct = _fmt(c.get("roofline_pct"), 1, " %")
        if c.get("roofline_pct") is not None and c["roofline_pct"] > 100:
            pct += " ⚠ above 100 %: measurement error"
        spread = c.get("spread") or {}
        body.append([row_label(row_key(c)), scen, ",".join(d.get("backend_used") or [c["backend"]]),
                     _fmt(c["tokens_per_s"]), f"{_fmt(spread.get('min'))}–{_fmt(spread.get('max'))}",
                     _fmt(c["decode_tokens_per_s"]), _fmt(c["prefill_s"], 4), _fmt(d.get("achieved_gbps")),
                     pct, str(c["repeats"])])
    return _markdown(header, body)


def memory_detail_table(results: dict) -> str:
    header = ["Model", "Scenario", "Peak allocated (GiB)", "Peak reserved (GiB)", "NVML process (GiB)",
              "Peak RSS (GiB)"]
    body = []
    for c in results.get("cells", []):
        scen = scenario_label(c)
        if c["status"] != "ok":
            body.append([row_label(row_key(c)), scen] + [STATUS_TEXT[c["status"]]] * 4)
            continue
        body.append([row_label(row_key(c)), scen] + [_fmt(c.get(k)) for k in
                    ("peak_allocated_gib", "peak_reserved_gib", "peak_nvml_gib", "peak_rss_gib")])
    return _markdown(header, body)


def _env_line(results: dict) -> str:
    env = results.get("env", {})
    bw = (results.get("bandwidth") or {}).get("bandwidth_gbps")
    hw = env.get("gpu") or env.get("cpu") or "unknown device"
    parts = [hw, f"torch {env.get('torch')}", f"transformers {env.get('transformers')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    parts.append(f"commit {env.get('commit')}")
    text = "Measured on " + ", ".join(parts) + f" ({env.get('date')})."
    if bw:
        text += f" Copy bandwidth measured in the same run: {bw:.1f} GB/s."
    if results.get("interrupted"):
        text += " The run was interrupted: cells it did not reach show as 'not measured'."
    return text


def speed_markdown(results: dict) -> str:
    return (f"# Speed\n\nTokens/s generating N new tokens from a 1-token context: new tokens / total "
            f"`generate` time (the seed's definition), median over repeats (min–max in brackets). "
            f"{_env_line(results)}\n\n{speed_table(results)}\n## Per cell\n\nEncode rows: prompt tokens "
            f"per second of prefill. Decode-only = later tokens / their time. % of roofline = achieved "
            f"GB/s (weights at stored precision + KV cache read per token) / copy bandwidth.\n\n"
            f"{decode_detail_table(results)}")


def memory_markdown(results: dict) -> str:
    return (f"# Peak memory\n\nGiB (2^30 bytes). On a GPU: peak allocated by the PyTorch allocator, reset per "
            f"cell; on the CPU: peak resident set (RSS) of the cell's process. The seed printed its GiB "
            f"values labelled 'GB'. {_env_line(results)}\n\n{memory_table(results)}\n## Per cell\n\n"
            f"{memory_detail_table(results)}")


def details_csv(results: dict) -> str:
    """Every cell field plus the scalar details (bytes/token, achieved GB/s, flags, ...)."""
    details = results.get("details", [])
    extra_keys = list(dict.fromkeys(k for d in details for k, v in d.items()
                                    if k == "backend_used" or not isinstance(v, (list, dict))))
    header = [k for k in CELL_FIELDS if k != "spread"] + ["spread_min", "spread_max"] + extra_keys
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i, c in enumerate(results.get("cells", [])):
        d = details[i] if i < len(details) else {}
        spread = c.get("spread") or {}
        values = [c.get(k) for k in CELL_FIELDS if k != "spread"] + [spread.get("min"), spread.get("max")]
        values += [",".join(d[k]) if k == "backend_used" and d.get(k) else d.get(k) for k in extra_keys]
        w.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def render_tables(results_json, out_dir=None) -> list[Path]:
    """Write speed.md, memory.md and details.csv from a results dict or results.json path; return the paths."""
    results = load_results(results_json)
    if out_dir is None:
        if not isinstance(results_json, (str, Path)):
            raise ValueError("out_dir is needed when results are given as a dict")
        out_dir = Path(results_json).parent
    out_dir = Path(out_dir)
    files = {"speed.md": speed_markdown(results), "memory.md": memory_markdown(results),
             "details.csv": details_csv(results)}
    paths = []
    for name, text in files.items():
        write_text_atomic(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


def format_summary(results) -> str:
    """The terminal summary: the two seed-shaped tables."""
    results = load_results(results)
    return f"Speed (tokens/s)\n{speed_table(results)}\nPeak memory\n{memory_table(results)}"
