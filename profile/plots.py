"""Plots from a results.json: decode latency against position, and peak memory split per cell.

Weights = bytes of parameters and buffers; KV cache = computed from the config and the final
length; activations = the measured peak minus the two (on the CPU that rest also holds the
runtime: libraries, allocator slack).
"""

from __future__ import annotations

from pathlib import Path

from qwen_quant.files import atomic_path
from qwen_quant.profile.tables import row_key, row_label, load_results

GIB = 2 ** 30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def _ok_cells(results: dict):
    details = results.get("details", [])
    for i, c in enumerate(results.get("cells", [])):
        if c["status"] == "ok" and i < len(details):
            yield c, details[i]


def _rolling_median(values: list[float], window: int) -> list[float]:
    import statistics

    half = window // 2
    return [statistics.median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def latency_plot(results: dict, path: Path) -> Path | None:
    """Milliseconds per decoded token against its position in the sequence (generate cells)."""
    cells = [(c, d) for c, d in _ok_cells(results) if c["scenario"] == "generate" and d.get("token_latency_s")]
    if not cells:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, d in cells:
        ms = [s * 1e3 for s in d["token_latency_s"]]
        # token k (k >= 2) is decoded with context + k - 1 positions already in the cache
        pos = [c["context_tokens"] + k for k in range(1, len(ms) + 1)]
        line, = ax.plot(pos, ms, linewidth=0.5, alpha=0.35)
        window = max(1, len(ms) // 50)
        ax.plot(pos, _rolling_median(ms, window) if window > 1 else ms, color=line.get_color(), linewidth=1.5,
                label=f"{row_label(row_key(c))}, {c['new_tokens']} tokens")
    ax.set_xlabel("position (tokens already in the KV cache)")
    ax.set_ylabel("decode latency per token (ms)")
    ax.set_title("Decode latency per token against position (median run; bold = rolling median)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def memory_breakdown(cell: dict, details: dict) -> dict | None:
    """GiB of weights, KV cache and activations (peak - weights - KV, never below 0) for one cell."""
    peak = cell.get("peak_allocated_gib")
    if peak is None:
        peak = cell.get("peak_rss_gib")
    if peak is None or details.get("weight_bytes") is None:
        return None
    weights = details["weight_bytes"] / GIB
    kv = (details.get("kv_bytes_final") or 0) / GIB
    return {"peak": peak, "weights": weights, "kv_cache": kv, "activations": max(0.0, peak - weights - kv)}


def memory_plot(results: dict, path: Path) -> Path | None:
    """Stacked bars per cell: weights / KV cache / activations, topped at the measured peak."""
    bars = [(c, memory_breakdown(c, d)) for c, d in _ok_cells(results)]
    bars = [(c, b) for c, b in bars if b]
    if not bars:
        return None
    on_cpu = all(c.get("peak_allocated_gib") is None for c, _ in bars)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars) + 2), 4.5))
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    rest = "activations + runtime" if on_cpu else "activations"
    for part, label in (("weights", "weights"), ("kv_cache", "KV cache"), ("activations", rest)):
        values = [b[part] for _, b in bars]
        ax.bar(x, values, bottom=bottom, label=label)
        bottom = [a + v for a, v in zip(bottom, values)]
    names = [f"{row_label(row_key(c))}\n{c['scenario']} "
             f"{c['context_tokens'] if c['scenario'] == 'encode' else c['new_tokens']}" for c, _ in bars]
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title("Peak memory per cell (" + ("RSS" if on_cpu else "peak allocated") + ")")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def render_plots(results_json, out_dir) -> list[Path]:
    """Write decode_latency.png and memory.png (each only when there is something to plot)."""
    results = load_results(results_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [latency_plot(results, out_dir / "decode_latency.png"), memory_plot(results, out_dir / "memory.png")]
    return [p for p in made if p is not None]
