#!/usr/bin/env bash
# Int4 against BF16 on this CPU (issue 22): decode tokens/s, prompt tokens/s and peak RSS with both engines, the
# demo model and Qwen2.5-Coder-1.5B, each cell a fresh process (qwen-profile); then the CPU backend's greedy
# tokens against the torch reference backend (experiments/cpu_backend_agreement.py).
#   bash experiments/cpu_int4_vs_bf16.sh OUT_DIR QWEN_FP QWEN_INT4[,QWEN_INT4_2...] [THREADS]
# QWEN_FP: the fp model folder (experiments/offline_qwen.py writes it), QWEN_INT4: GPTQ checkpoint(s) of it,
# comma-separated (e.g. the default and a --lm-head one: profiled side by side in one run).
# THREADS: "default" (torch's) or a number; run on a quiet machine (the load is recorded before each run).
# AGREEMENT=0 skips step 2, DEMO=0 the demo model's rows. ~25 min on 2 cores at one thread.
set -eu
OUT=${1:?usage: cpu_int4_vs_bf16.sh OUT_DIR QWEN_FP QWEN_INT4 [THREADS]}
QWEN_FP=$(cd "${2:?QWEN_FP}" && pwd); THREADS=${4:-default}
QWEN_INT4=(); IFS=, read -ra int4 <<< "${3:?QWEN_INT4}"
for c in "${int4[@]}"; do QWEN_INT4+=("$(cd "$c" && pwd)"); done
ROOT=$(cd "$(dirname "$0")/.." && pwd); BIN=$ROOT/.venv/bin
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
threads=(); [ "$THREADS" != default ] && threads=(--threads "$THREADS")
# the demo's Int4 form: RTN (speed and memory depend on the format, not on how the codes were chosen)
[ -f "$OUT/demo-int4/config.json" ] || "$BIN/qwen-quantize" demo --method rtn --nsamples 4 --seqlen 128 \
    --out "$OUT/demo-int4" --quiet > /dev/null
cd /tmp  # the repository's top-level profile/ would shadow the standard library
run() {  # name, models...
  local name=$1; shift
  echo "load before $name: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  "$BIN/qwen-profile" "$@" --engine hf,fast --encode 512 --gen 64 --repeat 2 --warmup 1 "${threads[@]}" \
      --out "$OUT/$name" --quiet > /dev/null
  echo "## $name"; "$BIN/python" "$ROOT/experiments/int4_bf16_ratios.py" "$OUT/$name/results.json"
}
[ "${DEMO:-1}" = 0 ] || run demo-threads-$THREADS demo "$OUT/demo-int4"
run qwen2.5-coder-1.5b-threads-$THREADS "$QWEN_FP" "${QWEN_INT4[@]}"
[ "${AGREEMENT:-1}" = 0 ] && exit 0
echo "load before agreement: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
OMP_NUM_THREADS=${THREADS/default/2} "$BIN/python" "$ROOT/experiments/cpu_backend_agreement.py" \
    "$OUT/agreement.json" "$OUT/demo-int4" "${QWEN_INT4[0]}" --tokens 32
