#!/usr/bin/env bash
# Configures and builds everything into ./build (ccache makes rebuilds fast).
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
# Paths under the checkout hash relative, so other build folders share the cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
cmake -S . -B build -G Ninja "$@"
ninja -C build -j"$(nproc)"
