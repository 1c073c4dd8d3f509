#!/usr/bin/env bash
# The GGUF export against llama.cpp's own quantizer, in one run on the same
# machine: a random Llama-shaped F16 checkpoint (about 210M parameters) is
# written as an F16 GGUF by the project; then for each preset,
#   - llama.cpp: llama_model_quantize (what llama-quantize calls) from that F16 GGUF;
#   - compress: `compress-worker run` with the preset as a GGUF output, from
#     the F16 safetensors (the job's whole time: read, encode, write, sha256);
# each three times (medians), on the same number of threads, and the two
# files' tensors compared byte for byte (build/bench/gguf_compare).
#
# llama.cpp is not a dependency of the project: name a libllama.so built from
# it (or a prebuilt one, e.g. node-llama-cpp's @node-llama-cpp/linux-x64) in
# LIBLLAMA. Its directory must hold the ggml libraries it links.
#   LIBLLAMA=/path/libllama.so bash bench/gguf_vs_llama_cpp.sh [PRESET...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build="$repo/build"
work="$build/gguf-vs-llama-cpp"
threads="${THREADS:-$(nproc)}"
if [ -z "${LIBLLAMA:-}" ] || [ ! -f "$LIBLLAMA" ]; then
  echo "gguf_vs_llama_cpp: set LIBLLAMA to a libllama.so (see the comment at the top)" >&2
  exit 2
fi
export LD_LIBRARY_PATH="$(dirname "$LIBLLAMA")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0 Q3_K_M Q2_K)

ftype_of() {  # llama.cpp's enum llama_ftype
  case "$1" in
    Q4_0) echo 2 ;; Q8_0) echo 7 ;; Q2_K) echo 10 ;; Q3_K_M) echo 12 ;;
    Q4_K_S) echo 14 ;; Q4_K_M) echo 15 ;; Q5_K_S) echo 16 ;; Q5_K_M) echo 17 ;; Q6_K) echo 18 ;;
    *) echo "gguf_vs_llama_cpp: no llama.cpp ftype for $1" >&2; exit 2 ;;
  esac
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

ninja -C "$build" compress-worker gguf_compare llama_cpp_quantize >/dev/null
rm -rf "$work" && mkdir -p "$work"
model="$work/model"
"$build/worker/compress-worker" make-random-model --out "$model" --layers 4 --hidden 2048 \
  --intermediate 5632 --heads 16 --kv-heads 16 --vocab 1024 --dtype f16 >/dev/null
cp "$repo/tests/fixtures/kjv-llama/tokenizer.json" "$model/"
recipe() {  # recipe PRESET
  printf 'model: {path: %s}\noutputs: [gguf]\ngguf: [{preset: %s}]\n' "$model" "$1" >"$work/$1.yaml"
}
recipe F16
"$build/worker/compress-worker" run --recipe "$work/F16.yaml" --out "$work/F16" \
  --threads "$threads" >/dev/null 2>&1
f16="$work/F16/gguf/model-F16.gguf"
echo "input: $(du -m "$model/model.safetensors" | cut -f1) MiB of F16 weights; $threads threads"
printf '| preset | llama.cpp s | compress s | speed-up | tensors byte-identical |\n'
printf '| --- | --- | --- | --- | --- |\n'
for preset in "${presets[@]}"; do
  ftype=$(ftype_of "$preset")
  recipe "$preset"
  theirs=() ours=()
  for _ in 1 2 3; do
    theirs+=("$("$build/bench/llama_cpp_quantize" "$f16" "$work/llama-$preset.gguf" "$ftype" \
      "$threads" 2>/dev/null)")
    rm -rf "$work/out-$preset"
    "$build/worker/compress-worker" run --recipe "$work/$preset.yaml" --out "$work/out-$preset" \
      --threads "$threads" >/dev/null 2>&1
    ours+=("$(jq -r .seconds "$work/out-$preset/report.json")")
  done
  t=$(printf '%s\n' "${theirs[@]}" | median)
  o=$(printf '%s\n' "${ours[@]}" | median)
  same=$("$build/bench/gguf_compare" "$work/llama-$preset.gguf" \
    "$work/out-$preset/gguf/model-$preset.gguf" | tail -1 | sed 's/ tensors identical.*//')
  printf '| %s | %.2f | %.2f | %.2fx | %s |\n' "$preset" "$t" "$o" "$(awk -v t="$t" -v o="$o" 'BEGIN { print t / o }')" "$same"
done
