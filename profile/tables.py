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

def prefix_speed(results: dict, key: tuple, n: int) -> float | None:
    """Tokens/s of the first n new tokens of a longer generate run of the same row (seed-shaped), from that
    run's own timeline: n / (prefill + the first n - 1 token latencies). None without such a run."""
    details = results.get("details", [])
    for i, c in enumerate(results.get("cells", [])):
        if row_key(c) != key or c.get("status") != "ok" or c["scenario"] != "generate" or not _seed_shaped(c) \
                or c["new_tokens"] <= n or c.get("batch", 1) not in (None, 1):
            continue
        d = details[i] if i < len(details) else {}
        lat, prefill = d.get("token_latency_s") or [], c.get("prefill_s")
        if len(lat) >= n - 1 and prefill:
            return n / (prefill + sum(lat[:n - 1]))
    return None


def _speed_cell(results: dict, rows: list[dict], key: tuple, n: int) -> tuple[str, float | None]:
    """(text, tokens/s): the cell measured at n, else the first n tokens of a longer run marked †."""
    c = _find(rows, key, "generate", n)
    if c is not None and c.get("status") is not None:
        return _speed_text(c), c.get("tokens_per_s") if c.get("status") == "ok" else None
    derived = prefix_speed(results, key, n)
    if derived is not None:
        return f"{derived:.2f} †", derived
    return _speed_text(c), None


def _ratio_rows(keys, values: dict, columns: int, label: str, digits: int = 2) -> list[list[str]]:
    """One 'Int4 / BF16' row per (model, engine) with both precisions: the ratio of each column's values."""
    out = []
    for model, engine in dict.fromkeys((k[0], k[2]) for k in keys):
        lo, hi = values.get((model, "int4", engine)), values.get((model, "bf16", engine))
        if lo is None or hi is None:
            continue
        cells = [f"{x / y:.{digits}f}x" if x and y else "—" for x, y in zip(lo, hi)]
        out.append([f"{model} Int4 / BF16{'' if engine == 'hf' else f' ({engine} engine)'} ({label})"]
                   + cells + ["—"] * (columns - len(cells)))
    return out


def speed_table(results: dict) -> str:
    rows = _planned(results)
    _, gens = _columns(rows)
    keys = _row_keys(rows)
    if any(g > 2048 for g in gens) and 2048 not in gens and any(prefix_speed(results, k, 2048) for k in keys):
        gens = sorted(gens + [2048])  # the seed's 2048 column, read off the longer runs' timelines
    seed_cols = [g for g in gens if g in (2048, 8192)
                 and any(SEED_SPEED.get((seed_model_size(k[0]), k[1])) for k in keys)]
    header = ["Model"] + [f"Speed ({g} tokens)" for g in gens] + [f"{SEED_LABEL}, {g} tokens" for g in seed_cols]
    body, values = [], {}
    for key in keys:
        seed = SEED_SPEED.get((seed_model_size(key[0]), key[1]), {}) if key[2] == "hf" else {}
        cells = [_speed_cell(results, rows, key, g) for g in gens]
        values[key] = [v for _, v in cells]
        body.append([row_label(key)] + [t for t, _ in cells] + [f"{seed[g]:.2f}" if g in seed else "—" for g in seed_cols])
    body += _ratio_rows(keys, values, len(gens) + len(seed_cols), "speed-up")
    return _markdown(header, body)


def timeline_check(results: dict) -> str | None:
    """Where a row has both a separate N-token cell and a longer run: the two figures for N side by side."""
    rows = _planned(results)
    _, gens = _columns(rows)
    lines = []
    for key in _row_keys(rows):
        for n in gens:
            c = _find(rows, key, "generate", n)
            derived = prefix_speed(results, key, n)
            if c is not None and c.get("status") == "ok" and derived is not None:
                diff = 100 * (derived - c["tokens_per_s"]) / c["tokens_per_s"]
                lines.append([row_label(key), str(n), f"{c['tokens_per_s']:.2f}", f"{derived:.2f}", f"{diff:+.1f} %"])
    return _markdown(["Model", "N", "separate N-token run", "first N tokens of the longer run", "difference"],
                     lines) if lines else None


def memory_table(results: dict) -> str:
    rows = _planned(results)
    encode, gens = _columns(rows)
    keys = _row_keys(rows)
    cols = [("encode", n) for n in encode] + [("generate", n) for n in gens]
    seed_cols = [col for col in cols if any(col in SEED_MEMORY.get((seed_model_size(k[0]), k[1]), {}) for k in keys)]

    def title(col):
        return f"Peak Usage for {'Encoding' if col[0] == 'encode' else 'Generating'} {col[1]} Tokens"

    header = ["Model"] + [title(c) for c in cols] + [f"{SEED_LABEL}, {title(c)[15:].lower()}" for c in seed_cols]
    body, values = [], {}
    for key in keys:
        seed = SEED_MEMORY.get((seed_model_size(key[0]), key[1]), {}) if key[2] == "hf" else {}
        found = [_find(rows, key, *c) for c in cols]
        values[key] = [_peak_gib(c)[0] if c is not None and c.get("status") == "ok" else None for c in found]
        body.append([row_label(key)] + [_memory_text(c) for c in found]
                    + [f"{seed[c]:.2f} GiB" if c in seed else "—" for c in seed_cols])
    body += _ratio_rows(keys, values, len(cols) + len(seed_cols), "memory")
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


def engines_table(results: dict) -> str | None:
    """Decode-only tokens/s of the fast engine against HF generate, per (model, precision, scenario) where
    both ran: the fast engine's speed-up in the same run."""
    cells = [c for c in results.get("cells", []) if c.get("status") == "ok" and c.get("decode_tokens_per_s")]
    lines = []
    for c in cells:
        if c["engine"] != "fast":
            continue
        hf = next((h for h in cells if h["engine"] == "hf" and all(h[k] == c[k] for k in (
            "model", "precision", "scenario", "context_tokens", "new_tokens"))), None)
        if hf:
            lines.append([f"{c['model']} {PRECISION_NAMES.get(c['precision'], c['precision'])}", scenario_label(c),
                          f"{hf['decode_tokens_per_s']:.2f}", f"{c['decode_tokens_per_s']:.2f}",
                          f"{c['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x"])
    return _markdown(["Model", "Scenario", "HF generate decode tok/s", "fast engine decode tok/s", "fast / HF"],
                     lines) if lines else None


CPU_INT4_NOTE = ("Int4 rows marked `cpu` ran the CPU backend: decode (up to 64 rows per call) reads the 4-bit "
                 "weights through torch's int4 kernel; a longer prompt dequantizes each layer once per call and "
                 "runs BF16's dense matmul, so encoding costs BF16's time plus that dequantize (kernels/cpu_backend.py).")


def _notes(results: dict) -> str:
    """Sentences a table needs to be read right, given what ran (only when it ran)."""
    used = {b for d in results.get("details", []) for plan in (d.get("backend_used") or []) for b in plan.split(",")}
    return f"\n{CPU_INT4_NOTE}\n" if "cpu" in used else ""


def speed_markdown(results: dict) -> str:
    engines = engines_table(results)
    engines = ("\n## The two engines side by side\n\nDecode-only tokens/s (later tokens over their own time) in the "
               f"same run:\n\n{engines}") if engines else ""
    check = timeline_check(results)
    check = ("\n## Columns measured two ways\n\nA separate N-token run against the first N tokens of a longer "
             f"run of the same row (what fills a † cell):\n\n{check}") if check else ""
    return (f"# Speed\n\nTokens/s generating N new tokens from a 1-token context: new tokens / total "
            f"`generate` time (the seed's definition), median over repeats (min–max in brackets). † = the "
            f"first N tokens of a longer run of the same row (prefill + the first N − 1 token latencies of its "
            f"own timeline), where no separate N-token run was made. Int4 / BF16 rows: the speed-up (above 1: "
            f"Int4 is faster). {_env_line(results)}\n\n{speed_table(results)}{_notes(results)}{engines}{check}\n## Per cell\n\nEncode rows: prompt tokens "
            f"per second of prefill. Decode-only = later tokens / their time. % of roofline = achieved "
            f"GB/s (weights at stored precision + KV cache read per token) / copy bandwidth.\n\n"
            f"{decode_detail_table(results)}")


def memory_markdown(results: dict) -> str:
    return (f"# Peak memory\n\nGiB (2^30 bytes). On a GPU: peak allocated by the PyTorch allocator, reset per "
            f"cell; on the CPU: peak resident set (RSS) of the cell's process. Int4 / BF16 rows: the memory "
            f"ratio (below 1: Int4 needs less). The seed printed its GiB "
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


# ------------------------------------------------------------------ the seed's two tables, across runs

SEED_SIZES = ("7b", "14b")


def seed_rows(runs: list[tuple[str, dict]]) -> list[dict]:
    """One row per (model size, precision, engine, device, run) of several results.json [(source, results)]:
    the seed's speed columns (2048, 8192; † where read off a longer run's timeline) and memory columns
    (encode 2048, generate 8192). Only Qwen-7B/14B shapes; cells never measured stay None."""
    out = []
    for source, results in runs:
        env = results.get("env", {})
        device = env.get("gpu") or env.get("cpu") or "unknown"
        rows = _planned(results)
        for key in _row_keys(rows):
            size = seed_model_size(key[0])
            if size is None:
                continue
            speed, derived = {}, {}
            for n in (2048, 8192):
                c = _find(rows, key, "generate", n)
                if c is not None and c.get("status") == "ok":
                    speed[n] = c["tokens_per_s"]
                elif prefix_speed(results, key, n) is not None:
                    speed[n], derived[n] = prefix_speed(results, key, n), True
                elif c is not None and c.get("status") in STATUS_TEXT:
                    speed[n] = STATUS_TEXT[c["status"]]
            memory = {}
            for col in (("encode", 2048), ("generate", 8192)):
                c = _find(rows, key, *col)
                if c is not None and c.get("status") == "ok":
                    memory[f"{col[0]} {col[1]}"] = _peak_gib(c)[0]
                elif c is not None and c.get("status") in STATUS_TEXT:
                    memory[f"{col[0]} {col[1]}"] = STATUS_TEXT[c["status"]]
            if not speed and not memory:  # none of the seed's columns measured on this row
                continue
            out.append({"size": size, "model": key[0], "precision": key[1], "engine": key[2], "device": device,
                        "date": (env.get("date") or "")[:10], "source": source, "speed": speed,
                        "speed_from_longer_run": derived, "memory_gib": memory})
    return out


def _seed_cell(value, derived: bool = False, unit: str = "") -> str:
    if value is None:
        return NOT_MEASURED
    if isinstance(value, str):
        return value
    return f"{value:.2f}{unit}{' †' if derived else ''}"


def seed_tables_markdown(rows: list[dict]) -> str:
    """The seed's speed and memory tables for Qwen-7B and Qwen-14B: its A100 rows, then every row we measured
    (engine, device and date named), and 'not measured' where nothing was."""
    speed = ["| Model | Precision | Engine | Device | Date | 2048 tokens (tok/s) | 8192 tokens (tok/s) |",
             "|---|---|---|---|---|---|---|"]
    memory = ["| Model | Precision | Engine | Device | Date | Encoding 2048 tokens | Generating 8192 tokens |",
              "|---|---|---|---|---|---|---|"]
    for size in SEED_SIZES:
        name = f"Qwen-{size.upper()}"
        for precision in ("bf16", "int4"):
            s_seed, m_seed = SEED_SPEED[(size, precision)], SEED_MEMORY[(size, precision)]
            label = PRECISION_NAMES[precision]
            speed.append(f"| {name} | {label} | HF generate (AutoGPTQ) | A100 (the seed) | — | {s_seed[2048]:.2f} | "
                         f"{s_seed[8192]:.2f} |")
            memory.append(f"| {name} | {label} | HF generate (AutoGPTQ) | A100 (the seed) | — | "
                          f"{m_seed[('encode', 2048)]:.2f} GiB | {m_seed[('generate', 8192)]:.2f} GiB |")
            ours = [r for r in rows if r["size"] == size and r["precision"] == precision]
            if not ours:
                speed.append(f"| {name} | {label} | ours | — | — | {NOT_MEASURED} | {NOT_MEASURED} |")
                memory.append(f"| {name} | {label} | ours | — | — | {NOT_MEASURED} | {NOT_MEASURED} |")
            for r in ours:
                engine = "HF generate" if r["engine"] == "hf" else f"{r['engine']} engine"
                head = f"| {name} | {label} | {engine} (qwen-quant) | {r['device']} | {r['date']} |"
                speed.append(head + " " + " | ".join(
                    _seed_cell(r["speed"].get(n) or r["speed"].get(str(n)),
                               (r["speed_from_longer_run"].get(n) or r["speed_from_longer_run"].get(str(n))))
                    for n in (2048, 8192)) + " |")
                memory.append(head + " " + " | ".join(
                    _seed_cell(r["memory_gib"].get(c), unit=" GiB") for c in ("encode 2048", "generate 8192")) + " |")
    return ("# The seed's tables: Qwen-7B and Qwen-14B, BF16 against Int4\n\n"
            "Speed: tokens/s generating N new tokens from a 1-token context, new tokens / total generate time (the "
            "seed's definition), batch 1, greedy, exact lengths. † = the first N tokens of a longer run of the same "
            "row, read off its per-token timeline. Memory: peak GiB allocated by the PyTorch allocator (the seed "
            "printed GiB labelled 'GB'). Our Qwen-7B/14B rows are synthetic models at the real shapes (random "
            "weights: speed and memory do not depend on the values). Every row names its engine, device and date; "
            "the JSON beside this page (seed-tables.json) holds the rows and the results.json each came from.\n\n"
            "## Speed\n\n" + "\n".join(speed) + "\n\n## Peak memory\n\n" + "\n".join(memory) + "\n")
