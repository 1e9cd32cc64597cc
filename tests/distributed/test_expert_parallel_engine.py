"""Expert parallelism through the engine on CPU (gloo, `mp` executor): a random Qwen2-MoE
(routed experts split whole over two ranks, token-slots exchanged with all_to_all, the gated
shared expert and attention split by TP) gives the greedy tokens and logprobs of one rank;
the flag is refused where it cannot apply; the load per expert reaches `get_metrics`."""

from __future__ import annotations

import pytest

from engine.engine_args import EngineArgs
from engine.entrypoints.llm import LLM
from engine.executor.abstract import RankedExecutor
from engine.sampling_params import SamplingParams
from tests.distributed.conftest import PROMPTS, assert_same_generation, run_engine
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


class _Ranks(RankedExecutor):
    """Canned take_expert_load answers per rank (no workers)."""

    def __init__(self, tp: int, pp: int, answers: list) -> None:
        self.world_size, self.pp_size, self.tp_size = tp * pp, pp, tp
        self.answers = answers

    def _submit(self, method, *args):
        return method

    def _collect(self, method, submitted):
        return self.answers

    def execute_model(self, scheduler_output):
        raise NotImplementedError


def test_executor_takes_one_rank_per_pipeline_stage():
    # TP ranks of a stage count the same routing (one speaks); stages hold other layers.
    assert _Ranks(2, 1, [[1, 2], [1, 2]]).take_expert_load() == [1, 2]
    assert _Ranks(2, 2, [[1, 2], [1, 2], [3, 0], [3, 0]]).take_expert_load() == [4, 2]
    assert _Ranks(2, 1, [None, None]).take_expert_load() is None


def test_ep2_reports_token_slots_per_expert(tmp_path, smollm2_tokenizer):
    """Every computed token passes each MoE layer once and takes top_k slots there, so the
    reported load sums to layers x top_k x tokens computed (prompt + output - 1 per request:
    the last sampled token is never fed back); both ranks count the same routing."""
    config = qwen2_moe_config(len(smollm2_tokenizer))
    save_random_model(config, tmp_path, smollm2_tokenizer)
    num_moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, enable_expert_parallel=True,
              num_kv_blocks=64, max_model_len=256, max_num_seqs=8,
              enable_prefix_caching=False, async_scheduling=False)
    executor = llm.core.executor
    answers: list[list] = []
    call = executor._call

    def spy(method, *args):
        result = call(method, *args)
        if method == "take_expert_load":
            answers.append(result)
        return result

    executor._call = spy
    try:
        assert "moe_expert_load" not in llm.get_metrics()  # warm-up's routing is no load
        max_tokens = 5
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        load = llm.get_metrics()["moe_expert_load"]
        computed = sum(len(p) + max_tokens - 1 for p in PROMPTS)
        assert len(load) == config.num_experts
        assert sum(load) == num_moe_layers * config.num_experts_per_tok * computed
        assert answers and all(ranks[0] == ranks[1] for ranks in answers)
        llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
        again = llm.get_metrics()["moe_expert_load"]  # cumulative; the buffers were zeroed
        assert sum(again) - sum(load) == (num_moe_layers * config.num_experts_per_tok *
                                          (len(PROMPTS[1]) + max_tokens - 1))
    finally:
        llm.core.shutdown()
