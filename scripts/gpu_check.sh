#!/usr/bin/env bash
# The whole GPU session in one call: every GPU-only check and benchmark, each under its own time
# budget, so one part that fails or runs long never costs the others. Results land in one tarball.
#   bash scripts/gpu_check.sh [OUTDIR] [PARTS]      (PARTS: comma list, default all)
#   DRY_RUN=1 bash scripts/gpu_check.sh /tmp/gpu_dry  (CPU rehearsal with tiny shapes)
set -u
OUTDIR=${1:-/tmp/gpu_out}
PARTS=${2:-cuda,kernels,fast,profile,quantize,quantize-gptaq}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DRY=()
if [ "${DRY_RUN:-0}" = "1" ]; then DRY=(--dry-run); export TRITON_INTERPRET=1; fi

if [ "${DRY_RUN:-0}" != "1" ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUTDIR/install.log" 2>&1 || echo "install failed" | tee -a "$OUTDIR/summary.txt"
  nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
  $PY - > "$OUTDIR/versions.txt" 2>&1 <<'PYEOF'
import torch, transformers, triton, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "triton", triton.__version__, "python", platform.python_version())
print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
PYEOF
fi
git rev-parse HEAD > "$OUTDIR/commit.txt" 2>/dev/null || true
date -u +%FT%TZ > "$OUTDIR/date.txt"

run() {  # run NAME BUDGET_S CMD...
  local name=$1 budget=$2; shift 2
  case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
  local start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s (budget ${budget}s)" | tee -a "$OUTDIR/summary.txt"
  tail -n 25 "$OUTDIR/$name.log"
}

run cuda     45  $PY scripts/gpu_cuda_check.py "$OUTDIR/cuda" "${DRY[@]}"
run kernels  "${KERNELS_BUDGET:-130}" $PY scripts/gpu_kernels.py "$OUTDIR/kernels" --budget "$(( ${KERNELS_BUDGET:-130} - 10 ))" "${DRY[@]}"
run fast     "${FAST_BUDGET:-110}" $PY scripts/gpu_fast_engine.py "$OUTDIR/fast" --budget-s "$(( ${FAST_BUDGET:-110} - 12 ))" ${FAST_ARGS:-} "${DRY[@]}"
run profile  210 bash scripts/gpu_profile.sh "${DRY[@]}" "$OUTDIR/profile"
run quantize 70  $PY scripts/gpu_quantize_timing.py "$OUTDIR/quantize" "${DRY[@]}"
run quantize-gptaq 70 $PY scripts/gpu_quantize_timing.py "$OUTDIR/quantize-gptaq" --gptaq 0.25 "${DRY[@]}"

if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" -C "$OUTDIR" . && cp "$OUTDIR/summary.txt" "$OUT/" 2>/dev/null; fi
cat "$OUTDIR/summary.txt"
