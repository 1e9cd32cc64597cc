#!/usr/bin/env bash
# Issue 20 (serving under load): one GPU call that serves the Llama-3.1-8B-shaped dummy model
# with `engine serve`, loads it with `engine bench serve` (500 x 1024/128 at --request-rate inf,
# then Poisson 16 req/s), and samples the API-server and engine-core processes with py-spy
# (wheel in .whl/) during the inf run, so the host time of each process is seen per function.
#
#   bash scripts/gpu_serve_profile.sh WHEELHOUSE     (logs and py-spy profiles under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WH=${1:-wheelhouse}
bash scripts/gpu_check.sh "$WH" install >"$OUT/install.txt" 2>&1; tail -1 "$OUT/install.txt"
python3 -m pip install -q --no-index --no-deps --target /tmp/spy .whl/py_spy-*.whl >/dev/null 2>&1
export PATH=/tmp/spy/bin:$PATH
export PYTHONPATH=/tmp/engine-site:$PWD:$PWD/plugins/cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
M=/tmp/llama-3.1-8b-shape
python3 scripts/make_llama8b_config.py $M >/dev/null
python3 -m engine.entrypoints.cli serve $M --load-format dummy --dtype bfloat16 \
  --max-model-len 2048 --port 8123 ${SERVE_ARGS:-} >"$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 240); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
grep -A12 "^Startup" "$OUT/serve.log" | head -14
CORE=$(pgrep -P $SERVER -f spawn_main | head -1)
B="python3 -m engine.entrypoints.cli bench serve --base-url http://127.0.0.1:8123 --input-len 1024 --output-len 128"
$B --num-prompts 64 --seed 1 >/dev/null 2>&1   # warm-up: compile and capture outside the timed runs
py-spy record -r 200 --nonblocking -f raw -o "$OUT/api.txt" -p $SERVER -d 30 >/dev/null 2>&1 &
py-spy record -r 200 --nonblocking -f raw -o "$OUT/core.txt" -p $CORE -d 30 >/dev/null 2>&1 &
echo "== serve 500 x 1024/128, rate inf (py-spy on api pid $SERVER, core pid $CORE)"
$B --num-prompts 500 --request-rate inf 2>&1 | tail -9
wait %2 %3 2>/dev/null
echo "== serve 500 x 1024/128, Poisson 16 req/s"
$B --num-prompts 500 --request-rate 16 --seed 2 2>&1 | tail -9
kill -INT $SERVER; wait $SERVER
ls -la "$OUT"
