#!/usr/bin/env bash
# The README's demo: install, build, start a server and a worker on loopback,
# compress a small model, show progress, the report and the fetched files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh

DEMO=build/demo
PORT="${DEMO_PORT:-50551}"
BIN=build
rm -rf "$DEMO" && mkdir -p "$DEMO/models"
export COMPRESS_SERVER="127.0.0.1:$PORT"

echo "== the project's trained test model: a 6-block Llama trained on the King James Bible"
cp -r tests/fixtures/kjv-llama "$DEMO/models/kjv-llama"
# Revelation was held out of training; the Gospels calibrate.
bash scripts/kjv-text.sh Rev1:1-Rev22:21 >"$DEMO/models/revelation.txt"
bash scripts/kjv-text.sh Matt1:1-John21:25 >"$DEMO/models/gospels.txt"

"$BIN/server/compress-server" --listen "127.0.0.1:$PORT" --metrics-listen 127.0.0.1:0 \
  --data-dir "$DEMO/data" --model-root "$DEMO/models" >"$DEMO/server.log" 2>&1 &
SERVER_PID=$!
"$BIN/worker/compress-worker" --server "127.0.0.1:$PORT" --work-dir "$DEMO/work" \
  >"$DEMO/worker.log" 2>&1 &
WORKER_PID=$!
trap 'kill $WORKER_PID $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q grpc_port "$DEMO/server.log" && break; sleep 0.1; done

echo "== submit examples/kjv-w4-gptq.yaml (GPTQ W4 g128, then evaluate) and watch it"
"$BIN/client/compressctl" submit --recipe examples/kjv-w4-gptq.yaml --watch | tee "$DEMO/submit.out"
JOB=$(grep -o 'job-[0-9a-f]*' "$DEMO/submit.out" | head -1)

echo "== the report: size, bits per weight, perplexity and KL before and after, samples"
"$BIN/client/compressctl" get "$JOB"

echo "== the same with round-to-nearest and an evaluate stage, for comparison"
"$BIN/client/compressctl" submit --recipe examples/w4-rtn.yaml --watch >"$DEMO/rtn.out"
RTN_JOB=$(grep -o 'job-[0-9a-f]*' "$DEMO/rtn.out" | head -1)
"$BIN/client/compressctl" get "$RTN_JOB" | sed -n '/^Report:/,$p'

echo "== fetch the artifacts (sha256 verified)"
"$BIN/client/compressctl" fetch "$JOB" --out "$DEMO/out"
find "$DEMO/out" -type f | sort | xargs ls -l
echo "== the GGUF file llama.cpp loads: metadata and tensors"
"$BIN/client/compressctl" inspect "$DEMO/out/gguf/kjv-llama-Q4_K_M.gguf" | sed -n '1,12p;/^Tensors/,/blk.0.ffn_up/p;/^Total/p'
echo "== delete the RTN job: its record and artifacts leave the server"
"$BIN/client/compressctl" delete "$RTN_JOB"
echo "== server metrics on port $(grep -o "metrics_port=[0-9]*" "$DEMO/server.log" | head -1 | cut -d= -f2) (/metrics)"
