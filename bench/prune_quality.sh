#!/usr/bin/env bash
# Quality of each pruning method on the trained test model: perplexity on
# the held-out text (Revelation) and KL divergence against the original, at
# 50% unstructured and 2:4, as a Markdown table (the README's), plus the
# perplexity lost as a ratio to magnitude pruning's at the same pattern.
#
#   bash bench/prune_quality.sh [MODEL_DIR] [WORK_DIR]
#
# Every job runs through `compress-worker run` (the worker's local mode) with
# an evaluate stage, so the figures are the ones a job's report shows.
# METHODS and PATTERNS narrow the rows (e.g. METHODS="magnitude wanda").
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-tests/fixtures/kjv-llama}"
WORK="${2:-build/prune-quality}"
WORKER=build/worker/compress-worker
command -v jq >/dev/null || { echo "jq is missing: bash scripts/setup.sh" >&2; exit 1; }
[ -x "$WORKER" ] || { echo "build first: bash scripts/build.sh" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK"

# Held-out text as the model was evaluated in training; calibration text
# from the training part (the Gospels), as in bench/quality.sh.
bash scripts/kjv-text.sh Rev1:1-Rev22:21 >"$WORK/revelation.txt"
bash scripts/kjv-text.sh Matt1:1-John21:25 >"$WORK/gospels.txt"

run() {  # name stages-json
  local name=$1 stages=$2
  cat >"$WORK/$name.json" <<EOF
{
  "name": "$name",
  "model": {"path": "$MODEL"},
  "stages": [
    $stages,
    {"evaluate": {"text_path": "$WORK/revelation.txt", "context_length": 128, "stride": 64}}
  ],
  "calibration": {"path": "$WORK/gospels.txt", "num_samples": 128, "sequence_length": 128},
  "outputs": ["DEQUANTIZED_SAFETENSORS"]
}
EOF
  local start end
  start=$(date +%s.%N)
  "$WORKER" run --recipe "$WORK/$name.json" --out "$WORK/$name" >/dev/null 2>"$WORK/$name.log"
  end=$(date +%s.%N)
  jq -r --arg name "$name" --arg seconds "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" '
    ([.stages[] | select(.method == "magnitude" or .method == "wanda" or .method == "sparsegpt")
      | .tensors[] | .sparsity]) as $pruned |
    (if ($pruned | length) > 0 then ($pruned | add / length) else 0 end) as $sparsity |
    "| \($name) | \($sparsity * 1000 | round / 10)% | " +
    "\(.evaluation.after.perplexity * 1000 | round / 1000) | " +
    "\(.evaluation.mean_kl_divergence * 10000 | round / 10000) | " +
    "\(.evaluation.top1_agreement * 1000 | round / 10)% | \($seconds | tonumber | round) s |"' \
    "$WORK/$name/report.json"
}

METHODS="${METHODS:-magnitude wanda sparsegpt}"
PATTERNS="${PATTERNS:-50 2:4 4:8}"
QUANTIZE="${QUANTIZE:-1}"  # also wanda 2:4 then GPTQ W4 g128: prune, then quantize

echo "| job | sparsity of the pruned linears | perplexity | KL (nats) | top-1 agreement | time |"
echo "|---|---|---|---|---|---|"
first=1
declare -A perplexity
for pattern in $PATTERNS; do
  case $pattern in
    50) settings='"sparsity": 0.5'; label=50pct ;;
    *:*) settings="\"n\": ${pattern%:*}, \"m\": ${pattern#*:}"; label=${pattern/:/of} ;;
    *) echo "unknown pattern $pattern" >&2; exit 2 ;;
  esac
  for method in $METHODS; do
    name="$method-$label"
    line=$(run "$name" "{\"prune\": {\"method\": \"${method^^}\", $settings}}")
    if [ $first = 1 ]; then
      jq -r '"| original (BF16) | 0% | \(.evaluation.before.perplexity * 1000 | round / 1000) | 0 | 100% | |"' \
        "$WORK/$name/report.json"
      first=0
    fi
    echo "$line"
    perplexity[$name]=$(jq '.evaluation.after.perplexity' "$WORK/$name/report.json")
  done
done
if [ "$QUANTIZE" = 1 ]; then
  run wanda-2of4-gptq-w4-g128 \
    '{"prune": {"method": "WANDA", "n": 2, "m": 4}}, {"gptq": {"bits": 4, "group_size": 128}}'
  run gptq-w4-g128 '{"gptq": {"bits": 4, "group_size": 128}}'
fi

# Perplexity lost, as a share of what magnitude pruning loses at the pattern.
original=$(jq '.evaluation.before.perplexity' "$WORK"/*/report.json | head -1)
echo
echo "| pattern | $(for m in $METHODS; do printf '%s | ' "$m"; done)"
echo "|---|$(for m in $METHODS; do printf -- '---|'; done)"
for pattern in $PATTERNS; do
  case $pattern in 50) label=50pct ;; *) label=${pattern/:/of} ;; esac
  base=${perplexity[magnitude-$label]:-}
  printf '| %s | ' "$pattern"
  for method in $METHODS; do
    value=${perplexity[$method-$label]}
    if [ -n "$base" ]; then
      awk -v v="$value" -v b="$base" -v o="$original" 'BEGIN { printf "%.0f%% | ", 100 * (v - o) / (b - o) }'
    else
      printf '%s | ' "$value"
    fi
  done
  echo
done
