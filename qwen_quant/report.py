"""qwen-report: the release report and the model card, both rendered from stored JSON.

`write_report(paths)` joins qwen-eval results (accuracy tables, accuracy/tables.py), qwen-profile results
(speed and memory tables, profile/tables.py) and qwen-quantize's quant_report.json into
reports/<model>/README.md. `model_card(report)` is a checkpoint's README.md (Hugging Face front matter, how it
was made, per-layer error), written by qwen-quantize with the checkpoint; `write_model_card(checkpoint, paths)`
adds the tables measured on that checkpoint.
"""


from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from qwen_quant.accuracy.tables import (NOT_MEASURED, _is_num, accuracy_table, all_metrics_table, env_lines,
                                       item_changes_section, long_context_table, meanings, provenance_lines)
from qwen_quant.errors import UserError
from qwen_quant.files import write_text_atomic

# ---------------------------------------------------------------- qwen-report: the release README

SEED_ACCURACY = """| model | MMLU | C-Eval (val) | GSM8K | HumanEval |
|---|---|---|---|---|
| Qwen-7B-Chat BF16 | 53.9 | 54.2 | 41.1 | 24.4 |
| Qwen-7B-Chat Int4 | 52.6 | 52.9 | 38.1 | 23.8 |
| Qwen-14B-Chat BF16 | 64.6 | 69.8 | 61.0 | 43.9 |
| Qwen-14B-Chat Int4 | 63.3 | 69.0 | 59.8 | 45.7 |
"""

THROUGHPUT_MEANING = ("- **tokens/s** (speed tables): new tokens / total `generate` time from a 1-token context "
                      "(the seed's definition: prefill included), median over repeats; decode-only tokens/s "
                      "counts the later tokens over their own time.\n"
                      "- **GiB**: 2^30 bytes. GPU: peak allocated by the PyTorch allocator, reset per cell "
                      "(reserved and NVML beside it in the details); CPU: peak RSS of the cell's process. "
                      "The seed printed GiB values labelled 'GB'.\n")


@dataclasses.dataclass
class Inputs:
    """The JSON files a report is built from, found by file name."""
    evals: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)
    profiles: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)
    quants: list[tuple[Path, dict]] = dataclasses.field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): give results.json / quant_report.json "
                        f"files written by qwen-eval, qwen-profile or qwen-quantize") from None


def find_inputs(paths: list[str | Path]) -> Inputs:
    """results.json (qwen-eval: `results` rows; qwen-profile: `cells`) and quant_report.json, in the
    given folders (searched recursively) or given directly."""
    found = Inputs()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} not found: give folders or files written by qwen-eval, qwen-profile or qwen-quantize")
        files = [p] if p.is_file() else sorted(list(p.rglob("results.json")) + list(p.rglob("quant_report.json")))
        for f in files:
            data = _read_json(f)
            if f.name == "quant_report.json" or "quantization_config" in data:
                found.quants.append((f, data))
            elif "cells" in data:
                found.profiles.append((f, data))
            elif isinstance(data.get("results"), list):
                found.evals.append((f, data))
            elif p.is_file():
                raise UserError(f"{f} is neither an eval, a profile nor a quant report JSON")
    if not (found.evals or found.profiles or found.quants):
        raise UserError(f"no results.json or quant_report.json under {', '.join(map(str, paths))}: "
                        f"run qwen-eval / qwen-profile / qwen-quantize first")
    return found


def report_model_name(inputs: Inputs) -> str:
    for _, q in inputs.quants:
        model = q.get("model") or {}
        name = model.get("base_model") or model.get("source")
        if name:
            return Path(str(name).rstrip("/")).name
    for _, e in inputs.evals:
        if e.get("models"):
            return e["models"][0]["label"]
    for _, p in inputs.profiles:
        cells = p.get("cells") or []
        if cells and cells[0].get("model"):
            return Path(str(cells[0]["model"]).rstrip("/")).name
    return "model"


def _demote(markdown: str) -> str:
    """A sub-report without its title, its other headings one level down (they nest under ours)."""
    markdown = re.sub(r"\A# [^\n]*\n+", "", markdown)
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def _relative(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target, start)
    except ValueError:
        return str(target)


def accuracy_section(inputs: Inputs) -> list[str]:
    out = ["## Accuracy\n"]
    if not inputs.evals:
        return out + [f"{NOT_MEASURED}: no qwen-eval results.json was given.\n"]
    for path, e in inputs.evals:
        out += [f"From `{path}` (models: " + ", ".join(f"`{m['label']}`" for m in e.get("models", [])) +
                "; the first is the reference for Δ):\n", accuracy_table(e)]
        for extra in (long_context_table(e),):
            if extra:
                out.append(extra)
        out += item_changes_section(e, level=3)
        out += ["<details><summary>All metrics, data slices</summary>\n", all_metrics_table(e),
                "\n".join(provenance_lines(e)) + "\n", "</details>\n"]
    names = " ".join(m["label"].lower() for _, e in inputs.evals for m in e.get("models", []))
    if re.search(r"qwen-(7|14)b", names):
        out += ["For reference, **the seed's published figures** (Qwen's 2023 Int4 release; A100, AutoGPTQ, "
                "not measured by us):\n", SEED_ACCURACY]
    return out


def speed_memory_sections(inputs: Inputs, out_dir: Path) -> list[str]:
    from qwen_quant.profile import tables

    if not inputs.profiles:
        return ["## Speed\n", f"{NOT_MEASURED}: no qwen-profile results.json was given.\n",
                "## Memory\n", f"{NOT_MEASURED}: no qwen-profile results.json was given.\n"]
    speed, memory = ["## Speed\n"], ["## Memory\n"]
    for path, p in inputs.profiles:
        speed.append(_demote(tables.speed_markdown(p)))
        memory.append(_demote(tables.memory_markdown(p)))
        for png in sorted(path.parent.glob("*.png")):
            shutil.copyfile(png, out_dir / png.name)  # the report folder stands on its own
            (memory if "mem" in png.stem else speed).append(f"![{png.stem}]({png.name})\n")
    return speed + memory


def _short(value, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_num(value) else NOT_MEASURED


def quantization_section(inputs: Inputs) -> list[str]:
    if not inputs.quants:
        return []
    out = ["## Quantization\n"]
    for path, q in inputs.quants:
        qc = q.get("quantization_config") or {}
        calib = q.get("calibration") or {}
        totals = q.get("totals") or {}
        out.append(f"- `{path.parent.name}`: {qc.get('quant_method', 'gptq')} bits {qc.get('bits')}, group size "
                   f"{qc.get('group_size')}, sym {qc.get('sym')}, desc_act {qc.get('desc_act')}, damp "
                   f"{qc.get('damp_percent')}; method {(q.get('settings') or {}).get('method')}; calibration "
                   f"{calib.get('nsamples')} x {calib.get('seqlen')} tokens from `{calib.get('source')}`; mean "
                   f"relative layer error {_short(totals.get('mean_rel_error'), 4)}; "
                   f"{_short(totals.get('seconds'), 1)} s; "
                   f"command `{q.get('command')}`")
    return out + [""]


def provenance_section(inputs: Inputs) -> list[str]:
    out = ["## Environment and commands\n"]
    for kind, items in (("qwen-eval", inputs.evals), ("qwen-profile", inputs.profiles)):
        for path, data in items:
            out += [f"**{kind}** (`{path}`)\n", env_lines(data.get("env") or {})]
    return out


def render_report(inputs: Inputs, out_dir: Path) -> str:
    name = report_model_name(inputs)
    parts = [f"# {name}: accuracy, speed and memory\n",
             "Written by `qwen-report` from the JSON files listed below; every number comes from them. "
             "Cells that ran out of memory show **OOM**, cells never measured **not measured** — never 0.\n"]
    parts += accuracy_section(inputs) + speed_memory_sections(inputs, out_dir) + quantization_section(inputs)
    metrics = meanings({"results": [r for _, e in inputs.evals for r in e.get("results", [])]})
    parts += ["## What the numbers mean\n", "\n".join(metrics) + "\n" + THROUGHPUT_MEANING]
    parts += provenance_section(inputs)
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def write_report(paths: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """qwen-report's API: find the JSONs, write <out_dir>/README.md (default reports/<model>/)."""
    inputs = find_inputs(paths)
    out = Path(out_dir) if out_dir else Path("reports") / report_model_name(inputs)
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    write_text_atomic(readme, render_report(inputs, out))
    return readme


# ---------------------------------------------------------------- the model card of a checkpoint


def _front_matter(report: dict) -> str:
    model = report["model"]
    lines = ["---"]
    if model.get("base_model"):
        lines.append(f"base_model: {model['base_model']}")
    if model.get("license"):
        lines.append(f"license: {model['license']}")
    lines.append("library_name: transformers")
    tags = ["gptq", f"int{report['quantization_config']['bits']}", "quantized", "qwen-quant"]
    if model.get("synthetic"):
        tags.append("synthetic")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    lines.append("---")
    return "\n".join(lines)


def _error_summary(layers: list[dict]) -> list[str]:
    """Mean and worst relative output error per linear kind (q_proj, down_proj ...) over the blocks."""
    kinds: dict[str, list[dict]] = {}
    for layer in layers:
        kinds.setdefault(layer["name"].rsplit(".", 1)[-1], []).append(layer)
    rows = ["| linear | layers | mean rel. error | worst | worst layer | fallbacks |", "|---|---|---|---|---|---|"]
    for kind, group in kinds.items():
        worst = max(group, key=lambda g: g["rel_error"])
        mean = sum(g["rel_error"] for g in group) / len(group)
        fallbacks = sum(1 for g in group if g["fallback"])
        rows.append(f"| {kind} | {len(group)} | {mean:.4f} | {worst['rel_error']:.4f} | {worst['name']} | {fallbacks} |")
    return rows


def _damp_range(report: dict) -> str:
    used = sorted({round(float(layer["damp_used"]), 4) for layer in report.get("layers", []) if "damp_used" in layer})
    return "not recorded" if not used else f"{used[0]}" if len(used) == 1 else f"{used[0]} to {used[-1]} by layer"


def _awq_line(report: dict) -> str:
    searched = [layer for layer in report.get("layers", []) if layer.get("awq_error_ratio") is not None]
    alphas = sorted(layer["awq_alpha"] for layer in searched if layer["awq_alpha"] is not None)
    found = (f"; scaled {len(alphas)} of {len(searched)} layers, alpha {alphas[0]:g}-{alphas[-1]:g}" if alphas
             else "; no scaling won on any layer")
    ratio = report["settings"].get("awq_drop_massive", 0.0)
    dropped = [layer for layer in searched if layer.get("awq_dropped_tokens")]
    narrowed = (f"; the search left out tokens over {ratio:g} x their sample's median norm "
                f"({len(dropped)} of {len(searched)} layers had some)" if ratio else "")
    return ("- activation-aware channel scales (AWQ's scale search) folded into the norms and up_proj before "
            f"quantizing: mean|x|^alpha / w^(1 - alpha) per input channel{found}{narrowed}")


def _shrink_line(report: dict) -> str:
    shrink = report["settings"]["shrink"]
    if shrink != "auto":
        return f"- Hessians shrunk toward their diagonal: every correlation between inputs scaled by {1 - shrink:g}"
    used = sorted(layer["shrink"] for layer in report.get("layers", []) if layer.get("shrink") is not None)
    return ("- Hessians shrunk toward their diagonal by each layer's Ledoit-Wolf intensity (how much its calibration "
            "samples disagree): " + (f"{used[0]:g} to {used[-1]:g} by layer" if used else "not recorded"))


def _massive_line(report: dict) -> str:
    names, settings = report["totals"].get("rtn_massive_layers") or [], report["settings"]
    return (f"- round-to-nearest instead of GPTQ where the inputs carry massive activations (a calibration sample's "
            f"largest token norm over its median above {settings['rtn_massive']})"
            + (" and calibration is thin (fewer tokens than the layer's inputs)" if settings.get("rtn_massive_thin", False)
               else "") + ": " + (f"{len(names)} linear(s), {', '.join(names)}" if names else "no linear here"))


def model_card(report: dict) -> str:
    model, qc, calib, totals = report["model"], report["quantization_config"], report["calibration"], report["totals"]
    title = model.get("base_model") or model.get("source")
    out = [_front_matter(report), ""]
    if model.get("synthetic"):
        out += ["> **SYNTHETIC — not a model.** Random weights at a real shape, for speed and memory measurements "
                "only. Its outputs mean nothing and it must never get an accuracy figure.", ""]
    group = "none (one group per row)" if qc["group_size"] == -1 else str(qc["group_size"])
    out += [
        f"# {title} — GPTQ Int{qc['bits']}",
        "",
        f"Quantized with qwen-quant {report['versions']['qwen_quant']} on {qc['meta']['date']} from `{model.get('source')}`.",
        "Standard GPTQ v1 checkpoint (`checkpoint_format: gptq`): transformers (optimum + GPTQModel), vLLM and "
        "GPTQModel load it unchanged. " + ("Embeddings stay 16-bit; the output head (lm_head) is quantized too "
                                           "(`lm_head: true`)." if qc.get("lm_head") else
                                           "Embeddings and lm_head stay 16-bit."),
        "",
        "## Settings",
        "",
        f"- method: {report['settings']['method']} (true-sequential, block by block, error-propagating)",
        f"- bits {qc['bits']}, group size {group}, {'symmetric' if qc['sym'] else 'asymmetric'}, "
        f"act-order (desc_act) {qc['desc_act']}, static groups {qc['static_groups']}, damp {qc['damp_percent']}, "
        f"range search (mse) {report['settings']['mse']}",
        *([f"- damping raised where calibration is thin: each layer max(damp, {report['settings']['damp_auto']} x "
           f"inputs / calibration tokens); used: {_damp_range(report)}"] if report["settings"].get("damp_auto") else []),
        *([_shrink_line(report)] if report["settings"].get("shrink") else []),
        *([f"- asymmetric calibration (GPTAQ): each layer fitted to the full-precision model's outputs, correction "
           f"scaled by alpha = {report['settings']['gptaq_alpha']}"] if report["settings"].get("gptaq_alpha") else []),
        *(["- scales refitted: after GPTQ chose the codes, each group's scale was moved to the least-squares optimum "
           "of the layer's output error on the calibration inputs"] if report["settings"].get("refit_scales") else []),
        *([_massive_line(report)] if report["settings"].get("rtn_massive") else []),
        *([_awq_line(report)] if report["settings"].get("awq_scales") else []),
        f"- command: `{report['command']}`",
        "",
        "## Calibration",
        "",
        f"{calib.get('nsamples')} samples x {calib.get('seqlen')} tokens from `{calib.get('source')}` "
        f"({calib.get('tokens')} real tokens, {calib.get('padding_tokens', 0)} padding tokens masked out).",
        "",
        "```json",
        # where the tokens came from: the corpora read, or how the model wrote them (--calib self)
        json.dumps(calib.get("corpora") or calib.get("generation") or [], indent=1, ensure_ascii=False)[:2000],
        "```",
        "",
        "## What was lost where",
        "",
        "Relative output error of each quantized linear on the calibration inputs, ||W X - Q X|| / ||W X||:",
        *(["(X: the inputs in the quantized model. GPTAQ aims at the fp model's outputs instead, so it accepts a "
           "larger error by this measure.)"] if report["settings"].get("gptaq_alpha") else []),
        "",
        *_error_summary(report["layers"]),
        "",
        f"All {totals['layers']} layers: mean {totals['mean_rel_error']:.4f}, worst {totals['max_rel_error']:.4f} "
        f"({totals['worst_layer']}); {totals['fallbacks']} fell back to round-to-nearest. "
        f"Quantization took {totals['seconds']:.1f} s on {report['device']}.",
        "",
        "## Kernels",
        "",
        report["downstream"]["note"],
        "",
        "Full per-layer numbers: `quant_report.json`.",
        "",
    ]
    return "\n".join(out)


def model_card_text(checkpoint: Path, inputs: Inputs) -> str:
    report_path = checkpoint / "quant_report.json"
    if not report_path.is_file():
        raise UserError(f"{checkpoint} has no quant_report.json: give a folder written by qwen-quantize")
    report = _read_json(report_path)
    try:
        card = model_card(report)
    except (KeyError, TypeError) as e:
        raise UserError(f"{report_path} lacks {e}: re-run qwen-quantize to write a complete report") from None
    parts = [card.rstrip("\n") + "\n"]
    if inputs.evals or inputs.profiles:
        parts.append("# Measured on this checkpoint\n")
        parts += accuracy_section(inputs) + speed_memory_sections(inputs, checkpoint)
        metrics = meanings({"results": [r for _, e in inputs.evals for r in e.get("results", [])]})
        parts += ["## What the numbers mean\n", "\n".join(metrics) + "\n" + THROUGHPUT_MEANING]
        parts += provenance_section(inputs)
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def write_model_card(checkpoint: str | Path, result_paths: list[str | Path] = ()) -> Path:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint folder {checkpoint} not found")
    inputs = find_inputs(list(result_paths)) if result_paths else Inputs()
    inputs.quants = []  # the card's own quant_report is the checkpoint's, already in the card
    readme = checkpoint / "README.md"
    write_text_atomic(readme, model_card_text(checkpoint, inputs))
    return readme


def write_seed_tables(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """reports/profile/seed-tables.md (+ .json): the seed's two tables from several qwen-profile results."""
    import json

    from qwen_quant.profile.tables import seed_rows, seed_tables_markdown

    files = []
    for p in map(Path, paths):
        found = sorted(p.rglob("results.json")) if p.is_dir() else [p]
        files += [f for f in found if f.is_file() and "cells" in _read_json(f)]
    if not files:
        raise UserError("no qwen-profile results.json found in the given folders: pass the seed runs' folders")
    out = Path(out) if out else Path("reports/profile/seed-tables.md")
    if out.suffix != ".md":
        out = out / "seed-tables.md"
    rows = seed_rows([(os.path.relpath(f, out.parent), _read_json(f)) for f in files])
    write_text_atomic(out.with_suffix(".json"), json.dumps({"rows": rows}, indent=1) + "\n")
    write_text_atomic(out, seed_tables_markdown(rows))
    return out


def write_comparison(paths: list[str | Path], out: str | Path, baseline: str | None = None,
                     title: str = "Comparison", keep: str | Path | None = None) -> Path:
    """OUT/README.md (+ comparison.json): several qwen-eval results (in the given order, the first model the
    reference) as one table with paired errors; with `baseline`, every model's perplexity loss against it;
    with `keep` (an earlier comparison.json), its results stay in the table unless `paths` re-measure the same
    model on the same task; `keep` alone writes its table again (a new title, or the tables as this version
    writes them) without measuring anything."""
    import json

    from qwen_quant.accuracy.tables import carry_rows, comparison_markdown, join_results

    files = []
    for p in map(Path, paths):
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"{p}: no results.json (give qwen-eval output folders)")
        files.append(f)
    if not files and not keep:
        raise UserError("nothing to compare: give qwen-eval output folders (DIR...) or --keep COMPARISON_JSON")
    earlier = None
    if keep:
        if not Path(keep).is_file():
            raise UserError(f"--keep {keep}: no such file (give the comparison.json of an earlier --compare)")
        earlier = _read_json(Path(keep))
        if earlier.get("kind") != "eval" or "runs" not in earlier:
            raise UserError(f"--keep {keep}: not a comparison.json written by qwen-report --compare")
    if files:
        try:
            joined = join_results([_read_json(f) for f in files])
        except ValueError as e:
            raise UserError(str(e)) from None
        joined = carry_rows(earlier, joined) if earlier else joined
    else:
        joined = earlier
    if baseline and baseline not in [m["label"] for m in joined["models"]]:
        raise UserError(f"--baseline {baseline!r} is none of the models: {', '.join(m['label'] for m in joined['models'])}")
    out = Path(out)
    write_text_atomic(out / "comparison.json", json.dumps(joined, indent=1, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(out / "README.md", comparison_markdown(joined, baseline, title))
    return out / "README.md"
