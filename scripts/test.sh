#!/usr/bin/env bash
# Installs what is needed, builds, and runs every test (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 900)
# The parsers under libFuzzer with ASan + UBSan, 20 s each (scripts/fuzz.sh).
bash scripts/fuzz.sh 20
