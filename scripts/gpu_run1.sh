#!/usr/bin/env bash
# Session helper: one time-boxed GPU call (install, GPU e2e tests, batch-1 latency, throughput
# profile). Prints a short tail of each; full logs under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash scripts/gpu_check.sh wheelhouse install >"$OUT/install.txt" 2>&1; tail -1 "$OUT/install.txt"
export PYTHONPATH=/tmp/engine-site:$PWD:$PWD/plugins/cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
python3 scripts/make_llama8b_config.py /tmp/llama-3.1-8b-shape >/dev/null
if [[ " $* " == *" tests "* ]]; then
  timeout 380 python3 -m pytest -v -x -p no:cacheprovider plugins/cuda/tests/test_gpu_e2e.py \
    plugins/cuda/tests/test_graph_runner.py >"$OUT/pytest.log" 2>&1; tail -3 "$OUT/pytest.log"
fi
if [[ " $* " == *" windows "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider plugins/cuda/tests/test_graph_groups.py \
    plugins/cuda/tests/test_ops_attention.py plugins/cuda/tests/test_gpu_e2e.py -s \
    >"$OUT/windows.log" 2>&1; grep -iE "window|passed|failed|error" "$OUT/windows.log" | tail -8
fi
if [[ " $* " == *" gemma2 "* ]]; then
  # Gemma-2-9B shape: within --max-model-len 2048 its 4096 window is full attention (one
  # KV-cache group, soft-caps on); with a 512 window the local layers form a second group.
  python3 scripts/make_gemma2_9b_config.py /tmp/gemma-2-9b-shape >/dev/null
  python3 scripts/make_gemma2_9b_config.py /tmp/gemma-2-9b-w512 --sliding-window 512 >/dev/null
  for m in gemma-2-9b-shape gemma-2-9b-w512; do
    timeout 300 python3 -m engine.entrypoints.cli bench throughput /tmp/$m \
      --load-format dummy --dtype bfloat16 --num-prompts ${NP:-1000} --input-len 1024 \
      --output-len 128 --ignore-eos --max-model-len 2048 --ceilings --no-hf-peer \
      >"$OUT/$m.log" 2>&1; echo "== $m"; tail -12 "$OUT/$m.log"
  done
fi
if [[ " $* " == *" moe "* ]]; then
  # Qwen3-30B-A3B shape (48 layers, 128 experts, top-8): kernel checks on the card, then
  # batch-1 decode against the active-bytes roofline and offline 1000 x 1024/128.
  python3 scripts/make_qwen3_30b_a3b_config.py /tmp/qwen3-30b-a3b-shape >/dev/null
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider plugins/cuda/tests/test_ops_moe.py \
    >"$OUT/moe-tests.log" 2>&1; tail -2 "$OUT/moe-tests.log"
  timeout 200 python3 -m engine.entrypoints.cli bench latency /tmp/qwen3-30b-a3b-shape \
    --load-format dummy --dtype bfloat16 --input-len 128 --output-len 256 --batch-size 1 \
    --max-model-len 4096 --ceilings >"$OUT/moe-latency.log" 2>&1; tail -12 "$OUT/moe-latency.log"
  timeout 400 python3 -m engine.entrypoints.cli bench throughput /tmp/qwen3-30b-a3b-shape \
    --load-format dummy --dtype bfloat16 --num-prompts ${NP:-1000} --input-len 1024 \
    --output-len 128 --ignore-eos --max-model-len 2048 --ceilings --no-hf-peer \
    >"$OUT/moe-throughput.log" 2>&1; tail -10 "$OUT/moe-throughput.log"
fi
if [[ " $* " == *" latency "* ]]; then
  timeout 200 python3 -m engine.entrypoints.cli bench latency /tmp/llama-3.1-8b-shape \
    --load-format dummy --dtype bfloat16 --input-len 128 --output-len 256 --batch-size 1 \
    --max-model-len 4096 ${LAT_ARGS:-} >"$OUT/latency.log" 2>&1; tail -22 "$OUT/latency.log"
fi
if [[ " $* " == *" profile "* ]]; then
  timeout 300 python3 plugins/cuda/scripts/profile_throughput.py /tmp/llama-3.1-8b-shape \
    --num-prompts ${NP:-300} --input-len 1024 --output-len 128 --out "$OUT/profile" ${PROF_ARGS:-} \
    >"$OUT/profile.log" 2>&1; tail -60 "$OUT/profile.log"
fi
if [[ " $* " == *" throughput "* ]]; then
  timeout 400 python3 -m engine.entrypoints.cli bench throughput /tmp/llama-3.1-8b-shape \
    --load-format dummy --dtype bfloat16 --num-prompts ${NP:-1000} --input-len 1024 --output-len 128 \
    --ignore-eos --max-model-len 2048 --ceilings --hf-num-prompts ${HF_NP:-32} ${TP_ARGS:-} \
    >"$OUT/throughput.log" 2>&1; tail -25 "$OUT/throughput.log"
fi
if [[ " $* " == *" structured "* ]]; then
  timeout 400 python3 -m engine.entrypoints.cli bench throughput /tmp/llama-3.1-8b-shape \
    --load-format dummy --dtype bfloat16 --num-prompts ${SO_NP:-256} --input-len 512 --output-len 128 \
    --ignore-eos --max-model-len 2048 --no-hf-peer --structured-json scripts/bench_schema.json \
    ${SO_ARGS:-} >"$OUT/structured.log" 2>&1; tail -12 "$OUT/structured.log"
fi
if [[ " $* " == *" decode-profile "* ]]; then
  timeout 200 python3 plugins/cuda/scripts/profile_decode.py /tmp/llama-3.1-8b-shape \
    --out "$OUT/decode" >"$OUT/decode.log" 2>&1; head -8 "$OUT/decode.log"
  grep -E "^ +[A-Za-z_].*(Self CUDA|ms|us)" "$OUT/decode/torch_profile.txt" | head -0
fi
