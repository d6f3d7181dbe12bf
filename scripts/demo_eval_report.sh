#!/usr/bin/env bash
# The eval + report part of `make demo`, run by scripts/demo.sh after it has quantized the demo model
# into $OUT/gptq-int4 (GPTQ) and $OUT/rtn-int4 (RTN):
#   1. qwen-eval: fp / GPTQ Int4 / RTN Int4 on exactly the same small slice: perplexity EN + ZH
#      (held-out splits) and a few hundred multiple-choice items (ARC-Easy, PIQA);
#   2. qwen-profile: speed and peak memory on the CPU at small lengths (BF16 and GPTQ Int4, its defaults);
#   3. qwen-report: $OUT/report/README.md, and the GPTQ checkpoint's model card.
# Sizes can be changed through the environment (defaults keep the whole demo under 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-out/demo}
PPL_WINDOWS=${PPL_WINDOWS:-8}    # windows of PPL_SEQLEN tokens per corpus
PPL_SEQLEN=${PPL_SEQLEN:-512}
MC_TASKS=${MC_TASKS:-arc-easy,piqa}
MC_LIMIT=${MC_LIMIT:-150}        # items per multiple-choice task (x2 tasks: a few hundred in all)
PROFILE_ENCODE=${PROFILE_ENCODE:-128}
PROFILE_GEN=${PROFILE_GEN:-32}
export QWEN_QUANT_QUIET=${QWEN_QUANT_QUIET:-0}

models=(demo)
for q in gptq-int4 rtn-int4; do
  if [ -f "$OUT/$q/config.json" ]; then models+=("$OUT/$q"); else echo "note: $OUT/$q not found, evaluating without it"; fi
done

step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "qwen-eval: ${models[*]} on ppl-wiki, ppl-zh, $MC_TASKS"
# one precision for every row: BF16, how Int4 runs on the CPU (the fp model alone would otherwise run fp32)
$BIN/qwen-eval "${models[@]}" --tasks "ppl-wiki,ppl-zh,$MC_TASKS" --ppl-windows "$PPL_WINDOWS" \
  --seqlen "$PPL_SEQLEN" --limit "$MC_LIMIT" --batch 8 --dtype bf16 --out "$OUT/eval"

profile_models=(demo)
[ -f "$OUT/gptq-int4/config.json" ] && profile_models+=("$OUT/gptq-int4")
step "qwen-profile: ${profile_models[*]} on the CPU (encode $PROFILE_ENCODE, generate $PROFILE_GEN)"
if $BIN/qwen-profile "${profile_models[@]}" --encode "$PROFILE_ENCODE" --gen "$PROFILE_GEN" \
     --warmup 1 --repeat 2 --out "$OUT/profile" --quiet; then
  profile_dir=("$OUT/profile")
else
  echo "note: qwen-profile failed; the report will show speed and memory as not measured"
  profile_dir=()
fi

step "qwen-report"
quant_dirs=()
for q in gptq-int4 rtn-int4; do [ -f "$OUT/$q/quant_report.json" ] && quant_dirs+=("$OUT/$q/quant_report.json"); done
$BIN/qwen-report "$OUT/eval" "${profile_dir[@]}" "${quant_dirs[@]}" --out "$OUT/report"
if [ -f "$OUT/gptq-int4/quant_report.json" ]; then
  $BIN/qwen-report --model-card "$OUT/gptq-int4" "$OUT/eval" "${profile_dir[@]}"
fi
echo
echo "report: $OUT/report/README.md"
