#!/usr/bin/env bash
# Session helper: one time-boxed call on a 2-GPU machine for issue 5: the small-message
# all-reduce check, TP=2 == TP=1 tokens, batch-1 latency and throughput at TP=1 and TP=2.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash scripts/gpu_check.sh wheelhouse install >"$OUT/install.txt" 2>&1; tail -1 "$OUT/install.txt"
export PYTHONPATH=/tmp/engine-site:$PWD:$PWD/plugins/cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L; nvidia-smi topo -m | head -4
M=/tmp/llama-3.1-8b-shape
python3 scripts/make_llama8b_config.py $M >/dev/null
BENCH=(python3 -m engine.entrypoints.cli bench)
if [[ " $* " == *" allreduce "* ]]; then
  timeout 150 python3 plugins/cuda/scripts/allreduce_check.py --world-size 2 >"$OUT/allreduce.log" 2>&1
  tail -30 "$OUT/allreduce.log"
fi
if [[ " $* " == *" equal "* ]]; then
  timeout 200 python3 plugins/cuda/scripts/tp_check.py $M --tp 2 --out /tmp/tpc >"$OUT/tp_check.log" 2>&1
  grep -E "TP=|all-reduce|generate" "$OUT/tp_check.log" | tail -8
fi
for tp in ${TPS:-1 2}; do
  if [[ " $* " == *" profile "* ]]; then
    timeout 200 python3 plugins/cuda/scripts/profile_decode.py $M --tp $tp --ranks --max-num-seqs 8 \
      --out "$OUT/prof_tp$tp" >"$OUT/profile_tp$tp.log" 2>&1
    grep -B2 -A40 "^generate e2e" "$OUT/profile_tp$tp.log" | grep -v "^/" | head -60
  fi
  if [[ " $* " == *" latency-apart "* && $tp -gt 1 ]]; then
    ENGINE_FUSED_ALLREDUCE_NORM=0 timeout 150 "${BENCH[@]}" latency $M --load-format dummy \
      --dtype bfloat16 --input-len 128 --output-len 256 --batch-size 1 --max-model-len 4096 \
      --no-hf-peer -tp $tp >"$OUT/latency_apart_tp$tp.log" 2>&1
    echo "(all-reduce and norm apart)"; grep -E "^ *engine |roofline" "$OUT/latency_apart_tp$tp.log"
  fi
  if [[ " $* " == *" latency "* ]]; then
    timeout 150 "${BENCH[@]}" latency $M --load-format dummy --dtype bfloat16 --input-len 128 \
      --output-len 256 --batch-size 1 --max-model-len 4096 --no-hf-peer -tp $tp \
      >"$OUT/latency_tp$tp.log" 2>&1; grep -E "^ *engine |roofline|startup" "$OUT/latency_tp$tp.log"
  fi
  if [[ " $* " == *" throughput "* ]]; then
    timeout 200 "${BENCH[@]}" throughput $M --load-format dummy --dtype bfloat16 --num-prompts ${NP:-300} \
      --input-len 1024 --output-len 128 --ignore-eos --max-model-len 2048 --no-hf-peer -tp $tp \
      >"$OUT/throughput_tp$tp.log" 2>&1; grep -E "^ *engine |roofline|startup" "$OUT/throughput_tp$tp.log"
  fi
done
