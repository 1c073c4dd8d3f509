#!/usr/bin/env bash
# Quality of each quantization method on the trained test model: perplexity
# on the held-out text (Revelation) and KL divergence against the original,
# bits per weight and file size, as a Markdown table (the README's).
#
#   bash bench/quality.sh [MODEL_DIR] [WORK_DIR]
#
# Every job runs through `compress-worker run` (the worker's local mode) with
# an evaluate stage, so the figures are the ones a job's report shows.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-tests/fixtures/kjv-llama}"
WORK="${2:-build/quality}"
WORKER=build/worker/compress-worker
command -v jq >/dev/null || { echo "jq is missing: bash scripts/setup.sh" >&2; exit 1; }
[ -x "$WORKER" ] || { echo "build first: bash scripts/build.sh" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK"

# Held-out text as the model was evaluated in training; calibration text
# from the training part (the Gospels), as a user calibrates on their data.
bash scripts/kjv-text.sh Rev1:1-Rev22:21 >"$WORK/revelation.txt"
bash scripts/kjv-text.sh Matt1:1-John21:25 >"$WORK/gospels.txt"

run() {  # name stage settings-json
  local name=$1 method=$2 settings=$3
  cat >"$WORK/$name.json" <<EOF
{
  "name": "$name",
  "model": {"path": "$MODEL"},
  "stages": [
    {"$method": $settings},
    {"evaluate": {"text_path": "$WORK/revelation.txt", "context_length": 128, "stride": 64}}
  ],
  "calibration": {"path": "$WORK/gospels.txt", "num_samples": 128, "sequence_length": 128},
  "outputs": ["PACKED_SAFETENSORS"]
}
EOF
  local start end
  start=$(date +%s.%N)
  "$WORKER" run --recipe "$WORK/$name.json" --out "$WORK/$name" >/dev/null 2>"$WORK/$name.log"
  end=$(date +%s.%N)
  jq -r --arg name "$name" --arg seconds "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" '
    "| \($name) | \(.evaluation.after.perplexity * 1000 | round / 1000) | " +
    "\(.evaluation.mean_kl_divergence * 10000 | round / 10000) | " +
    "\(.evaluation.top1_agreement * 1000 | round / 10)% | " +
    "\(.bits_per_weight * 100 | round / 100) | " +
    "\(.size_after_bytes | tonumber / 1048576 * 100 | round / 100) MiB | \($seconds | tonumber | round) s |"' \
    "$WORK/$name/report.json"
}

# Which rows: METHODS and SETTINGS narrow them (e.g. METHODS="rtn awq").
METHODS="${METHODS:-rtn gptq gptq-act awq awq-gptq hqq}"
SETTINGS="${SETTINGS:-w4-g128 w4-channel w3-g128 w2-g64 nf4}"

echo "| method | perplexity | KL (nats) | top-1 agreement | bits/weight | size | time |"
echo "|---|---|---|---|---|---|---|"
ORIGINAL=$(stat -c %s "$MODEL/model.safetensors")
first=1
row() {  # name stage settings-json
  local line
  line=$(run "$@")
  if [ $first = 1 ]; then
    jq -r --arg size "$ORIGINAL" '
      "| original (BF16) | \(.evaluation.before.perplexity * 1000 | round / 1000) | 0 | 100% | 16 | " +
      "\($size | tonumber / 1048576 * 100 | round / 100) MiB | |"' "$WORK/$1/report.json"
    first=0
  fi
  echo "$line"
}
for setting in $SETTINGS; do
  if [ "$setting" = nf4 ]; then
    row nf4-b64 bnb_4bit '{"type": "BNB_4BIT_NF4"}'
    row nf4-b64-double-quant bnb_4bit '{"type": "BNB_4BIT_NF4", "double_quant": true}'
    row fp4-b64 bnb_4bit '{"type": "BNB_4BIT_FP4"}'
    continue
  fi
  case $setting in
    w4-g128) grid='"bits": 4, "group_size": 128' ;;
    w4-channel) grid='"bits": 4, "group_size": -1' ;;
    w3-g128) grid='"bits": 3, "group_size": 128' ;;
    w2-g64) grid='"bits": 2, "group_size": 64' ;;
    *) echo "unknown setting $setting" >&2; exit 2 ;;
  esac
  for method in $METHODS; do
    case $method in
      gptq-act) row "$method-$setting" gptq "{$grid, \"act_order\": true}" ;;
      awq) row "$method-$setting" awq "{$grid, \"clip\": true}" ;;  # AutoAWQ's defaults
      awq-noclip) row "$method-$setting" awq "{$grid}" ;;
      awq-gptq) row "$method-$setting" awq "{$grid, \"quantizer\": \"AWQ_QUANTIZER_GPTQ\"}" ;;
      *) row "$method-$setting" "$method" "{$grid}" ;;
    esac
  done
done
