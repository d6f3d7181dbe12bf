#!/usr/bin/env bash
# The user's whole path on a GPU (issue 18): qwen-quantize -> load_quantized on every backend -> qwen-profile
# and qwen-eval on the checkpoint just written.
#
#   bash scripts/gpu_user_path.sh OUT_DIR [BUDGET_S]      synthetic:qwen-7b on cuda (default budget 600 s)
#   DRY_RUN=1 bash scripts/gpu_user_path.sh OUT_DIR       CPU rehearsal: synthetic:tiny, tiny calibration
#
# 1. qwen-quantize with the defaults (128 x 2048 calibration, act-order + static groups + range search): per-block
#    seconds (its log), peak GPU memory (quant_report's allocator peaks; NVML sampled by nvidia-smi alongside)
#    and host RSS. Stopped at 45 % of the budget if not done: the finished blocks' seconds are extrapolated and
#    labelled so, and the rest of the path uses a round-to-nearest checkpoint of the whole model instead.
#    Then --method rtn on the whole model (its cost; 4 x 64 calibration tokens feed only its error report).
# 2. The checkpoint through load_quantized with each backend (auto, cuda, triton, torch): greedy tokens agree
#    across backends, logits against the torch backend within tolerance (scripts/gpu_user_path.py backends).
# 3. qwen-profile on that checkpoint: fast engine, generate 2048, one cell.
# 4. qwen-eval on cuda on that checkpoint and on the fp model: ppl-wiki (4 windows) and 20 ARC-Easy items with
#    --allow-synthetic: a path check and its cost per item, not an accuracy (the weights are random).
# Everything lands in OUT_DIR; `python scripts/gpu_user_path.py render OUT_DIR` writes the report.
set -u
OUT=${1:?usage: gpu_user_path.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-600}
source "$(dirname "$0")/gpu_env.sh"

if [ "${DRY_RUN:-0}" = "1" ]; then
  MODEL=synthetic:tiny; DEVICE=cpu; CALIB=(--nsamples 4 --seqlen 64); GEN=32; WINDOWS=2; SEQ=64; ITEMS=4
  export OMP_NUM_THREADS=1
else
  MODEL=synthetic:qwen-7b; DEVICE=cuda; CALIB=(); GEN=2048; WINDOWS=4; SEQ=512; ITEMS=20
fi
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
note() { echo "$*" | tee -a "$OUT/steps.txt"; }

# GPU memory of our processes, sampled every 500 ms while the path runs (NVML through nvidia-smi)
if command -v nvidia-smi > /dev/null && [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 500 > "$OUT/nvml.csv" 2>/dev/null &
  NVML_PID=$!
fi

# 1. quantize (GPTQ defaults) within 45 % of the budget, then RTN
t0=$(date +%s)
(cd /tmp && timeout --signal=INT --kill-after=20 $(( BUDGET * 45 / 100 )) "$BIN/qwen-quantize" "$MODEL" \
    --device $DEVICE "${CALIB[@]}" --out "$OUT/gptq" --overwrite) > "$OUT/quantize-gptq.log" 2>&1
note "quantize gptq rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s)
# RTN's weights need no calibration; its samples only feed the per-layer error report: a few are enough
(cd /tmp && timeout --signal=INT 120 "$BIN/qwen-quantize" "$MODEL" --method rtn --device $DEVICE --nsamples 4 \
    --seqlen 64 --out "$OUT/rtn" --overwrite) > "$OUT/quantize-rtn.log" 2>&1
note "quantize rtn rc=$? $(( $(date +%s) - t0 ))s"
CKPT=$OUT/gptq; [ -f "$CKPT/quant_report.json" ] || CKPT=$OUT/rtn
note "path continues with $CKPT"

# 2. every backend on that checkpoint
t0=$(date +%s)
(cd /tmp && "$BIN/python" "$REPO/scripts/gpu_user_path.py" backends "$CKPT" "$OUT/backends.json" --device $DEVICE) \
    > "$OUT/backends.log" 2>&1
note "backends rc=$? $(( $(date +%s) - t0 ))s"

# 3. qwen-profile on the checkpoint (fast engine, one generate cell)
if [ "$(left)" -gt 60 ]; then
  t0=$(date +%s)
  (cd /tmp && "$BIN/qwen-profile" "$CKPT" --engine fast --encode none --gen $GEN --repeat 1 --warmup 1 \
      --device $DEVICE --cell-timeout 120 --out "$OUT/profile" --quiet) > "$OUT/profile.log" 2>&1
  note "profile rc=$? $(( $(date +%s) - t0 ))s"
else note "profile skipped: $(left)s left"; fi

# 4. qwen-eval on cuda: the checkpoint and the fp model, a path check
if [ "$(left)" -gt 60 ]; then
  t0=$(date +%s)
  (cd /tmp && timeout --signal=INT $(( $(left) - 15 )) "$BIN/qwen-eval" "$MODEL" "$CKPT" --tasks ppl-wiki,arc-easy \
      --limit $ITEMS --ppl-windows $WINDOWS --seqlen $SEQ --device $DEVICE --allow-synthetic --out "$OUT/eval" --quiet) \
      > "$OUT/eval.log" 2>&1
  note "eval rc=$? $(( $(date +%s) - t0 ))s"
else note "eval skipped: $(left)s left"; fi

[ -n "${NVML_PID:-}" ] && kill "$NVML_PID" 2>/dev/null
note "gpu_user_path: $(( $(date +%s) - start ))s of ${BUDGET}s"
