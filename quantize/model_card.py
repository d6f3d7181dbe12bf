"""The README.md model card of a quantized checkpoint: what it is, how it was made, what was lost where."""

from __future__ import annotations

import json


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
        "GPTQModel load it unchanged. Embeddings and lm_head stay 16-bit.",
        "",
        "## Settings",
        "",
        f"- method: {report['settings']['method']} (true-sequential, block by block, error-propagating)",
        f"- bits {qc['bits']}, group size {group}, {'symmetric' if qc['sym'] else 'asymmetric'}, "
        f"act-order (desc_act) {qc['desc_act']}, static groups {qc['static_groups']}, damp {qc['damp_percent']}, "
        f"range search (mse) {report['settings']['mse']}",
        *([f"- asymmetric calibration (GPTAQ): each layer fitted to the full-precision model's outputs, correction "
           f"scaled by alpha = {report['settings']['gptaq_alpha']}"] if report["settings"].get("gptaq_alpha") else []),
        *(["- scales refitted: after GPTQ chose the codes, each group's scale was moved to the least-squares optimum "
           "of the layer's output error on the calibration inputs"] if report["settings"].get("refit_scales") else []),
        f"- command: `{report['command']}`",
        "",
        "## Calibration",
        "",
        f"{calib.get('nsamples')} samples x {calib.get('seqlen')} tokens from `{calib.get('source')}` "
        f"({calib.get('tokens')} real tokens, {calib.get('padding_tokens', 0)} padding tokens masked out).",
        "",
        "```json",
        json.dumps(calib.get("corpora", []), indent=1, ensure_ascii=False)[:2000],
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
