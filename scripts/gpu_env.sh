# Sourced by the GPU session's scripts: the output folder made absolute, the repository as the working
# directory, BIN = where our console scripts are (this checkout's .venv here, the installed ones on the GPU
# machine), and no tokenizer threads or hub calls.  Usage: OUT=...; source scripts/gpu_env.sh
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
BIN=${BIN:-$([ -x .venv/bin/qwen-quantize ] && echo "$REPO/.venv/bin" || dirname "$(command -v qwen-quantize)")}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
