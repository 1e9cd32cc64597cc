"""Tensor parallelism on an MoE model, on CPU (gloo, `mp` executor): Qwen2-MoE (routed experts
split along their intermediate dim, the gated shared expert, a dense layer) over two ranks
gives the greedy tokens and logprobs of one."""

from __future__ import annotations

from tests.distributed.conftest import assert_same_generation, run_engine
from tests.models.test_moe import qwen2_moe_config
from tests.models.test_phi3 import save_random_model


def test_tp2_equals_tp1_on_qwen2_moe(tmp_path, smollm2_tokenizer):
    save_random_model(qwen2_moe_config(len(smollm2_tokenizer)), tmp_path, smollm2_tokenizer)
    single = run_engine(str(tmp_path), tp=1)
    split = run_engine(str(tmp_path), tp=2)
    assert_same_generation(single, split)
