#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang, ASan + UBSan) into ./build-fuzz
# and runs each for a bounded time: bash scripts/fuzz.sh [SECONDS] [TARGET...]
# SECONDS per target (default 20); TARGETs: gguf recipe safetensors_header
# tokenizer (default all). Each run starts from a copy of its committed
# corpus (fuzz/corpus/NAME) in build-fuzz, so the source tree is never
# written. Exits nonzero if any target crashes, leaks, trips a sanitizer or
# breaks an invariant; the input that did it is build-fuzz/crashes/NAME/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(gguf recipe safetensors_header tokenizer); fi

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
if [ ! -f build-fuzz/build.ninja ]; then
  CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCOMPRESS_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g"
fi
ninja -C build-fuzz -j"$(nproc)" "${targets[@]/#/fuzz_}"

symbolizer="$(command -v llvm-symbolizer-14 || command -v llvm-symbolizer || true)"
if [ -n "$symbolizer" ]; then export ASAN_SYMBOLIZER_PATH="$symbolizer"; fi
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

failed=()
for name in "${targets[@]}"; do
  corpus="build-fuzz/corpus/$name"
  crashes="build-fuzz/crashes/$name"
  rm -rf "$corpus"
  mkdir -p "$corpus" "$crashes"
  cp fuzz/corpus/"$name"/* "$corpus"/
  # Inputs that once crashed it run first, with the corpus.
  find fuzz/regressions -name "$name-*" -exec cp {} "$corpus"/ \;
  dict=()
  if [ -f "fuzz/$name.dict" ]; then dict=(-dict="fuzz/$name.dict"); fi
  echo "== fuzz_$name: ${seconds}s from $(ls "$corpus" | wc -l) inputs"
  # -timeout: one input over 10 s is a hang; -rss_limit_mb: over 2 GiB is
  # a memory blow-up. Both count as failures, like a crash.
  if ! "build-fuzz/fuzz/fuzz_$name" "$corpus" "${dict[@]}" -max_total_time="$seconds" \
      -timeout=10 -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1 \
      -artifact_prefix="$crashes/" 2>"build-fuzz/fuzz_$name.log"; then
    tail -n 60 "build-fuzz/fuzz_$name.log"
    failed+=("$name")
  else
    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|#[0-9]+ *DONE)' \
      "build-fuzz/fuzz_$name.log" || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]} (inputs in build-fuzz/crashes/; reproduce with" \
       "build-fuzz/fuzz/fuzz_NAME FILE)" >&2
  exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran ${seconds}s each with no finding"
