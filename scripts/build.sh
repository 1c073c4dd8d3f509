#!/usr/bin/env bash
# Configures and builds everything into ./build (ccache makes rebuilds fast).
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
cmake -S . -B build -G Ninja "$@"
ninja -C build -j"$(nproc)"
