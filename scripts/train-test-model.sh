#!/usr/bin/env bash
# Reproduces tests/fixtures/kjv-llama: trains the test model on the King James
# text with the project's own BPE trainer and training loop (about an hour on
# 2 cores). Bitwise reproduction needs the same thread count, LibTorch and
# OpenBLAS; any run with these settings lands within a few percent of the
# recorded held-out perplexity.
#
#   bash scripts/train-test-model.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-tests/fixtures/kjv-llama}"
bash scripts/setup.sh
bash scripts/build.sh
build/tools/train_test_model --out "$OUT" --steps 1400 --batch 16 --seq 128 --threads 2 --seed 1
