#!/usr/bin/env bash
# The seed's speed and memory tables for one Qwen shape on a GPU (issues 19 and 20), measured by qwen-profile.
#
#   bash scripts/gpu_seed.sh 7b  OUT_DIR [BUDGET_S]     synthetic:qwen-7b  (default budget 600 s)
#   bash scripts/gpu_seed.sh 14b OUT_DIR [BUDGET_S]     synthetic:qwen-14b
#   DRY_RUN=1 bash scripts/gpu_seed.sh 7b OUT_DIR       CPU rehearsal: synthetic:tiny, lengths 2048 -> 32, 8192 -> 64
#
# Batch 1, greedy, exact lengths, every cell in a fresh process, --backend auto. The cells go in the order the
# most valuable land first: HF BF16 generate-8192, HF Int4 generate-8192, the fast engine (BF16 and Int4) at
# 8192 then 2048, the encode-2048 cells (the seed's memory column), then separate HF 2048 cells. HF generate
# ran at 10.4 tok/s (BF16, 7B) on the H200 on 2026-11-28, which would make one 8192 cell ~13 minutes: so a
# 256-token HF probe runs first (its own folder, not in the table), and each HF step's estimate comes from the
# probe's speed; an HF 8192 step that cannot fit is skipped in favour of its 2048 cell. One timed
# run per generate cell and a short warm-up of the same shapes (16 tokens), never a full-length one. A
# generate-8192 run's per-token timeline gives the 2048 column where no separate 2048 run was made (marked
# † in speed.md; where both exist speed.md compares them). Each step is one qwen-profile call adding to the
# same results.json; a step starts only when the budget still holds its estimate, and each cell has a timeout,
# so a slow cell cannot eat the rest. What did not fit shows as "not measured". Finally the seed's combined
# page: qwen-report --seed-tables over reports/profile and OUT_DIR.
set -u
SIZE=${1:?usage: gpu_seed.sh 7b|14b OUT_DIR [BUDGET_S]}
OUT=${2:?usage: gpu_seed.sh 7b|14b OUT_DIR [BUDGET_S]}
BUDGET=${3:-600}
source "$(dirname "$0")/gpu_env.sh"

if [ "${DRY_RUN:-0}" = "1" ]; then
  MODEL=synthetic:tiny; L2048=32; L8192=64; DEVICE=(--device cpu --threads 1); TIMEOUT=120
  EST=(5 5 10 10 10 5)
else
  MODEL=synthetic:qwen-$SIZE; L2048=2048; L8192=8192; DEVICE=(--device cuda)
  case $SIZE in  # seconds per step on an H100/H200, from the 2026-11-28 H200 run (fast engine) and HF estimates
    7b)  TIMEOUT=300; EST=(230 170 120 60 100 100) ;;
    14b) TIMEOUT=420; EST=(330 260 170 80 140 150) ;;
    *) echo "size must be 7b or 14b" >&2; exit 2 ;;
  esac
fi

start=$(date +%s)
step=0
profile() {  # profile ESTIMATE_S ARGS...: one qwen-profile call into OUT, if the budget still holds it
  local est=$1; shift
  step=$((step + 1))
  local left=$(( BUDGET - ($(date +%s) - start) ))
  if [ "$left" -lt "$est" ]; then
    echo "step $step skipped: ${left}s left, needs ~${est}s ($*)" | tee -a "$OUT/steps.txt"
    return 0
  fi
  local t0=$(date +%s)
  # from /tmp: the repository's top-level profile/ would shadow the standard library's
  (cd /tmp && "$BIN/qwen-profile" "$MODEL" "$@" --backend auto --warmup 1 --repeat 2 --gen-repeat 1 \
      --cell-timeout "$TIMEOUT" "${DEVICE[@]}" --out "$OUT" --quiet) > "$OUT/step$step.log" 2>&1
  echo "step $step rc=$? $(( $(date +%s) - t0 ))s: $*" | tee -a "$OUT/steps.txt"
}

# the HF probe: tokens/s of BF16 HF generate over 256 tokens (64 in a dry run), and the seconds a step of N
# HF tokens per precision would take from it (Int4 assumed no faster than BF16: a safe estimate)
PROBE=$([ "${DRY_RUN:-0}" = "1" ] && echo 16 || echo 256)
t0=$(date +%s)
(cd /tmp && "$BIN/qwen-profile" "$MODEL" --engine hf --precision bf16 --encode none --gen $PROBE --backend auto \
    --warmup 1 --repeat 1 --cell-timeout "$TIMEOUT" "${DEVICE[@]}" --out "$OUT/hf-probe" --quiet) > "$OUT/probe.log" 2>&1
HF_TPS=$("${BIN}/python" -c "import json,sys; c=json.load(open(sys.argv[1]))['cells'][0]; print(c['tokens_per_s'] or 0)" \
    "$OUT/hf-probe/results.json" 2>/dev/null || echo 0)
echo "probe: HF BF16 $HF_TPS tok/s over $PROBE tokens in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
hf_est() {  # seconds for one HF generate cell of $1 tokens (+ 45 s for the process, the model and warm-up)
  "${BIN}/python" -c "import sys; t=float(sys.argv[2]); print(int(int(sys.argv[1]) / t * 1.15 + 45) if t > 0 else 99999)" "$1" "$HF_TPS"
}
HF8=$(hf_est $L8192); HF2=$(hf_est $L2048)
[ "${DRY_RUN:-0}" = "1" ] || TIMEOUT=$(( HF8 > TIMEOUT ? HF8 : TIMEOUT ))

left=$(( BUDGET - ($(date +%s) - start) ))
if [ $(( 2 * HF8 )) -le $(( left - EST[2] - EST[3] )) ]; then
  profile "$HF8"            --engine hf   --precision bf16      --encode none --gen $L8192
  profile "$HF8"            --engine hf   --precision int4      --encode none --gen $L8192
else  # both HF 8192 cells and the fast engine's do not fit: the HF 2048 cells take their place
  echo "HF generate-$L8192 not run: ~${HF8}s per cell at the probe's speed, ${left}s left" | tee -a "$OUT/steps.txt"
  profile "$(( 2 * HF2 ))"  --engine hf   --precision bf16,int4 --encode none --gen $L2048
fi
profile "${EST[2]}"         --engine fast --precision bf16,int4 --encode none --gen $L8192
profile "${EST[3]}"         --engine fast --precision bf16,int4 --encode none --gen $L2048
profile "${EST[4]}"         --engine hf,fast --precision bf16,int4 --encode $L2048 --gen none
profile "$(( 2 * HF2 ))"    --engine hf   --precision bf16,int4 --encode none --gen $L2048

(cd /tmp && "$BIN/qwen-report" --seed-tables "$REPO/reports/profile" "$OUT" --out "$OUT/seed-tables.md") \
    >> "$OUT/steps.txt" 2>&1
echo "gpu_seed $SIZE: $(( $(date +%s) - start ))s of ${BUDGET}s" | tee -a "$OUT/steps.txt"
