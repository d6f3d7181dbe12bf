#!/usr/bin/env bash
# The fast engine against HF generate on this CPU (issue 16): decode-only tokens/s, BF16, the demo model and
# synthetic:tiny, at the default thread count and at one thread; each cell a fresh process, 3 timed runs.
#   bash experiments/cpu_fast_vs_hf.sh OUT_DIR        (~6 min on 2 quiet cores)
# Prints each run's "two engines side by side" table (speed.md); run it on a quiet machine (load is recorded).
set -eu
OUT=${1:?usage: cpu_fast_vs_hf.sh OUT_DIR}
BIN=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd /tmp  # the repository's top-level profile/ would shadow the standard library
for model in demo synthetic:tiny; do
  for threads in default 1; do
    name=$(echo "$model" | tr ':' '-')-threads-$threads
    extra=(); [ "$threads" = 1 ] && extra=(--threads 1)
    echo "load before $name: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
    "$BIN/qwen-profile" "$model" --engine hf,fast --precision bf16 --encode none --gen 128 --repeat 3 --warmup 1 \
        "${extra[@]}" --out "$OUT/$name" --quiet > /dev/null
    echo "## $name" && sed -n '/two engines side by side/,/^## /p' "$OUT/$name/speed.md" | grep '^|'
  done
done
