"""Expert parallelism through the engine on CPU (gloo, `mp` executor): a random Qwen2-MoE
(routed experts split whole over two ranks, token-slots exchanged with all_to_all, the gated
shared expert and attention split by TP) gives the greedy tokens and logprobs of one rank;
the flag is refused where it cannot apply."""

from __future__ import annotations

import pytest

from engine.engine_args import EngineArgs
from tests.distributed.conftest import assert_same_generation, run_engine
from tests.models.test_moe import qwen2_moe_config
from tests.models.test_phi3 import save_random_model


def test_ep2_equals_one_rank_on_qwen2_moe(tmp_path, smollm2_tokenizer):
    save_random_model(qwen2_moe_config(len(smollm2_tokenizer)), tmp_path, smollm2_tokenizer)
    single = run_engine(str(tmp_path), tp=1)
    split = run_engine(str(tmp_path), tp=2, enable_expert_parallel=True)
    assert_same_generation(single, split)


def test_expert_parallel_is_refused_for_a_dense_model(tmp_path):
    from transformers import LlamaConfig

    from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer
    from tests.models.test_config_refusals import SMALL

    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    save_word_level_tokenizer(str(tmp_path), SMALL["vocab_size"])
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        EngineArgs(model=str(tmp_path), load_format="dummy",
                   enable_expert_parallel=True).create_config()
