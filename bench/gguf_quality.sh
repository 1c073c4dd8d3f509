#!/usr/bin/env bash
# GGUF presets on the trained test model: each converted by a job, read back
# as llama.cpp dequantizes it, and measured by the project's runtime on the
# held-out Revelation (perplexity, KL against the original, top-1
# agreement), with bits per weight and size; then each type's quantization
# throughput against a memory copy.
#
#   bash bench/gguf_quality.sh [MODEL_DIR] [WORK_DIR] [--presets Q4_K_M,Q4_K_M+imatrix]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-tests/fixtures/kjv-llama}"
WORK="${2:-build/gguf-quality}"
[ -x build/bench/gguf_bench ] || { echo "build first: bash scripts/build.sh" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK"
bash scripts/kjv-text.sh Rev1:1-Rev22:21 >"$WORK/revelation.txt"
# Importance presets (NAME+imatrix) calibrate on the Gospels, as bench/quality.sh.
bash scripts/kjv-text.sh Matt1:1-John21:25 >"$WORK/gospels.txt"
build/bench/gguf_bench --model "$MODEL" --text "$WORK/revelation.txt" --work "$WORK" \
    --calibration "$WORK/gospels.txt" --context 128 --stride 64 "$@"
