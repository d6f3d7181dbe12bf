#!/usr/bin/env bash
# The main job on the offline default model: quantize (GPTQ and RTN), evaluate, profile, report.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
$BIN/qwen-quantize demo --nsamples 32 --seqlen 512 --out "$OUT/gptq-int4" --overwrite
