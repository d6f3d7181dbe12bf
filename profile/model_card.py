"""`qwen-report --model-card CHECKPOINT [DIR ...]`: the checkpoint's README.md, ready to upload.

The quantizer's card (quantize/model_card.py: Hugging Face front matter with base_model, license and
tags carried from the base model; settings; calibration; per-layer error) plus the accuracy, speed
and memory tables measured on this checkpoint (qwen-eval / qwen-profile results given as DIRs).
"""

from __future__ import annotations

from pathlib import Path

from qwen_quant.errors import UserError
from qwen_quant.files import write_text_atomic
from qwen_quant.profile.report import (Inputs, THROUGHPUT_MEANING, accuracy_section, find_inputs, meanings,
                                       provenance_section, speed_memory_sections, _read_json)


def model_card_text(checkpoint: Path, inputs: Inputs) -> str:
    from qwen_quant.quantize.model_card import model_card

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
