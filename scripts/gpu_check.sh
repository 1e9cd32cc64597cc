#!/usr/bin/env bash
# The one command for a GPU machine without internet: install from an offline wheelhouse
# (made where an index is reachable with `bash scripts/wheelhouse.sh wheelhouse`), run the
# CUDA plugin's tests, then the benchmarks of issue 4 on a Llama-3.1-8B-shaped model with
# dummy weights, and print a short table last. Logs go to $OUT (if set) or /tmp/engine-gpu.
#
#   bash scripts/gpu_check.sh [WHEELHOUSE] [STAGE...]
#     WHEELHOUSE  folder of wheels (default: $WHEELHOUSE, else ./wheelhouse)
#     STAGE       install | smoke | tests | latency | throughput | all (default: all); install always
#                 runs first. Split the stages over several calls where one call is time-boxed.
#   env: PYTHON (default python3), NUM_PROMPTS (1000), HF_NUM_PROMPTS (32), PYTEST_ARGS,
#        BENCH_ARGS (extra flags for both benchmarks, e.g. "--gpu-memory-utilization 0.8")
#
# The checkout's code always runs (PYTHONPATH puts it first); the wheels supply the
# dependencies and the `engine.plugins` entry points, so a wheelhouse built before a code
# change stays usable.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WH=${WHEELHOUSE:-wheelhouse}
if [ $# -gt 0 ] && [ -d "$1" ]; then WH=$1; shift; fi
STAGES=${*:-all}
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/engine-gpu}
mkdir -p "$LOG"
rm -f "$LOG"/{summary.txt,pytest.log,latency.log,throughput.log}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
want() { [[ " $STAGES " == *" all "* || " $STAGES " == *" $1 "* ]]; }
say() { echo "== $*" | tee -a "$LOG/summary.txt"; }

# ---- install -------------------------------------------------------------------------------
[ -d "$WH" ] || { echo "no wheelhouse at '$WH': build one with scripts/wheelhouse.sh" >&2; exit 2; }
(nvidia-smi -L || true) | tee "$LOG/device.txt"
PIP=("$PY" -m pip)
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  PIP=("$PY" "$(ls "$WH"/pip-*.whl | head -1)/pip")   # pip runs from its own wheel
fi
if "${PIP[@]}" install -q --no-index --find-links "$WH" "engine[cuda,structured]" pytest pytest-timeout \
    >"$LOG/install.log" 2>&1
then
  say "installed engine[cuda,structured] from $WH into $("$PY" -c 'import sys; print(sys.prefix)')"
else
  # The image's environment is not writable (or pip refused): put the wheels of what it lacks
  # into a folder of our own, first on the path.
  SITE=/tmp/engine-site
  "$PY" - "$WH" >"$LOG/missing.txt" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    if name.startswith("engine-") and name != "engine-cuda":
        continue  # other platforms' plugins: not what this machine runs
    try:
        md.distribution(name)
        if name in ("engine", "engine-cuda"):
            print(wheel)
    except md.PackageNotFoundError:
        print(wheel)
EOF
  "${PIP[@]}" install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    $(cat "$LOG/missing.txt") >>"$LOG/install.log" 2>&1 || { cat "$LOG/install.log"; exit 1; }
  export PATH="$SITE/bin:$PATH" PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $(wc -l <"$LOG/missing.txt") wheels the image lacks into $SITE (--target)"
fi
export PYTHONPATH="$ROOT:$ROOT/plugins/cuda${PYTHONPATH:+:$PYTHONPATH}"
ENGINE=("$PY" -m engine.entrypoints.cli)
"${ENGINE[@]}" plugins 2>&1 | tee "$LOG/plugins.txt"
status=0

# ---- smoke: platform kits, graphs vs eager, attention kernel timings --------------------------
if want smoke; then
  "$PY" plugins/cuda/scripts/gpu_smoke.py 2>&1 | tee "$LOG/smoke.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  "$PY" -m engine_cuda.ops.bench_ops 2>&1 | tee "$LOG/bench_ops.log"
  say "smoke: $(grep -cE 'PASS' "$LOG/smoke.log") PASS, $(grep -cE 'FAIL' "$LOG/smoke.log") FAIL"
fi

# ---- tests ---------------------------------------------------------------------------------
if want tests; then
  "$PY" -m pytest -q -p no:cacheprovider plugins/cuda/tests ${PYTEST_ARGS:-} 2>&1 \
    | tee "$LOG/pytest.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  say "tests: $(grep -E '(passed|failed|error|collected)' "$LOG/pytest.log" | tail -1)"
fi

# ---- benchmarks ----------------------------------------------------------------------------
MODEL=/tmp/llama-3.1-8b-shape
if want latency || want throughput; then
  "$PY" scripts/make_llama8b_config.py "$MODEL" >/dev/null || exit 1
fi
COMMON=(--load-format dummy --dtype bfloat16)
if want latency; then
  "${ENGINE[@]}" bench latency "$MODEL" "${COMMON[@]}" --input-len 128 --output-len 256 \
    --batch-size 1 --max-model-len 4096 ${BENCH_ARGS:-} 2>&1 | tee "$LOG/latency.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want throughput; then
  "${ENGINE[@]}" bench throughput "$MODEL" "${COMMON[@]}" --num-prompts "${NUM_PROMPTS:-1000}" \
    --input-len 1024 --output-len 128 --ignore-eos --max-model-len 2048 --ceilings \
    --hf-num-prompts "${HF_NUM_PROMPTS:-32}" ${BENCH_ARGS:-} 2>&1 | tee "$LOG/throughput.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# ---- the short table -----------------------------------------------------------------------
echo
echo "device: $(head -1 "$LOG/device.txt")"
for f in latency throughput; do
  [ -f "$LOG/$f.log" ] || continue
  echo "[$f]"
  grep -E '^(startup|engine startup|platform|hf-transformers runs|device copy|matmul rate|'\
'bandwidth|compute|TPOT ratio|useful output)|^ *(runner|engine|hf-transformers) ' \
    "$LOG/$f.log" | sed 's/^/  /'
done
cat "$LOG/summary.txt"
exit $status
