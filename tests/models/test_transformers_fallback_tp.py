"""Tensor parallelism for the transformers fallback, by the HF class's TP plan: TP=2 over two
real processes (gloo, `mp` executor) gives HF's and TP=1's greedy tokens and logprobs,
batched with chunked prefill, for Granite (q/k/v/o and the MLP split, biases on), OLMo 2
(its plan keeps attention whole and splits the MLP) and `--model-impl transformers` on
Llama; each rank holds and loads only its slice and declares its own heads; what the plan
cannot split is refused by name, with the flag."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GraniteConfig, LlamaConfig, Olmo2Config

from engine import LLM, SamplingParams
from engine.distributed import ParallelContext, use_parallel
from engine.engine_args import EngineArgs
from engine.models.layers.attention import Attention
from engine.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine.models.loader.model_loader import load_model
from engine.models.transformers_fallback import TransformersForCausalLM
from engine.models.transformers_fallback_tp import check_local_heads
from tests.models.hf_reference import hf_greedy
from tests.models.test_transformers_fallback import (
    BLOCK_SIZE,
    MAX_TOKENS,
    SMALL,
    _config_dir,
    _prompts,
    _save,
)

DENSE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False, **SMALL)
CASES = {
    "granite": lambda: GraniteConfig(attention_multiplier=0.2, embedding_multiplier=3.0,
                                     residual_multiplier=0.6, logits_scaling=2.5,
                                     attention_bias=True, mlp_bias=True, **DENSE),
    # q_norm/k_norm over all heads: its plan gathers q/k/v and splits only the MLP
    "olmo2": lambda: Olmo2Config(**DENSE),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param + "-tp")
    return str(directory), _save(CASES[request.param](), directory)


def _generate(directory: str, tp: int, **kwargs):
    """Greedy outputs of the prompts, batched, prefills chunked by a 16-token budget."""
    llm = LLM(model=directory, dtype="float32", tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else None,
              max_num_batched_tokens=16, max_num_seqs=3, block_size=BLOCK_SIZE,
              max_model_len=128, num_kv_blocks=64, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params,
                            use_tqdm=False)
    finally:
        llm.core.shutdown()
    return [o.outputs[0] for o in outs]


def _chosen_logprobs(out) -> torch.Tensor:
    return torch.tensor([entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)])


def test_tp2_greedy_equals_tp1_and_hf(model_dir):
    directory, hf_model = model_dir
    single, split = _generate(directory, tp=1), _generate(directory, tp=2)
    for prompt, one, two in zip(_prompts(), single, split):
        tokens, logprobs = hf_greedy(hf_model, prompt, MAX_TOKENS)
        assert list(two.token_ids) == list(one.token_ids) == tokens
        torch.testing.assert_close(_chosen_logprobs(two), torch.tensor(logprobs),
                                   rtol=1e-4, atol=1e-4)


def test_model_impl_transformers_tp2_on_llama_gives_native_tokens(tmp_path):
    hf_model = _save(LlamaConfig(**DENSE), tmp_path)
    native = _generate(str(tmp_path), tp=1, model_impl="native")
    fallback = _generate(str(tmp_path), tp=2, model_impl="transformers")
    for prompt, a, b in zip(_prompts(), native, fallback):
        assert list(b.token_ids) == list(a.token_ids) == hf_greedy(hf_model, prompt, MAX_TOKENS)[0]
        torch.testing.assert_close(_chosen_logprobs(b), _chosen_logprobs(a),
                                   rtol=1e-4, atol=1e-4)


def test_each_rank_holds_and_loads_its_slice(tmp_path):
    """Rank 1 of 2, built in this process (no communicator: only shapes and loading are
    looked at): the planned linears are ours at half size, holding the checkpoint's second
    half; embeddings, norms and the head stay whole; attention is declared with 2 of the 4
    query heads and 1 of the 2 KV heads."""
    _save(CASES["granite"](), tmp_path)
    full = load_file(str(tmp_path / "model.safetensors"))
    config = EngineArgs(model=str(tmp_path), dtype="float32",
                        tensor_parallel_size=2).create_config()
    with use_parallel(ParallelContext(tp_rank=1, tp_size=2)):
        model = load_model(config.model, "cpu", torch.float32)
    assert isinstance(model, TransformersForCausalLM)
    attn = model.hf.model.layers[0].self_attn
    mlp = model.hf.model.layers[0].mlp
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        assert isinstance(linear, ColumnParallelLinear)
    assert isinstance(attn.o_proj, RowParallelLinear) and isinstance(mlp.down_proj,
                                                                      RowParallelLinear)
    params = dict(model.hf.named_parameters())
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(params[q + ".weight"], full[q + ".weight"][32:])
    torch.testing.assert_close(params[q + ".bias"], full[q + ".bias"][32:])
    torch.testing.assert_close(params[o + ".weight"], full[o + ".weight"][:, 32:])
    torch.testing.assert_close(params[o + ".bias"], full[o + ".bias"])  # added once, whole
    for whole in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert params[whole].shape == full[whole].shape
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert [(a.num_heads, a.num_kv_heads) for a in layers] == [(2, 1), (2, 1)]


def test_a_class_without_a_tp_plan_is_refused(tmp_path):
    directory = _config_dir(tmp_path, GPT2Config(n_layer=2, n_embd=64, n_head=4,
                                                 vocab_size=256))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel:\n.*--tensor-parallel-size 2: "
                                         r"GPT2LMHeadModel declares no tensor-parallel plan"
                                         r".*--tensor-parallel-size 1"):
        EngineArgs(model=directory, tensor_parallel_size=2).create_config()


def test_a_style_the_fallback_does_not_implement_is_refused(tmp_path, monkeypatch):
    plan = dict(GraniteConfig.base_model_tp_plan, **{"norm": "sequence_parallel"})
    monkeypatch.setattr(GraniteConfig, "base_model_tp_plan", plan)
    directory = _config_dir(tmp_path, CASES["granite"]())
    with pytest.raises(ValueError, match=r"'norm' the style 'sequence_parallel'.*"
                                         r"--tensor-parallel-size 1"):
        EngineArgs(model=directory, tensor_parallel_size=2).create_config()


def test_fewer_kv_heads_than_ranks_is_refused(tmp_path):
    config = CASES["granite"]()
    config.num_key_value_heads = 1
    directory = _config_dir(tmp_path, config)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) is fewer than the ranks"
                                         r".*--tensor-parallel-size 1 or less"):
        EngineArgs(model=directory, tensor_parallel_size=2).create_config()


def test_a_planned_module_that_is_not_a_linear_is_refused(monkeypatch):
    """GPT-2's projections are Conv1D (weights stored transposed): a plan naming one is
    refused at build, naming the module and the style."""
    monkeypatch.setattr(GPT2Config, "base_model_tp_plan", {"h.*.attn.c_attn": "colwise"})
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)
    with use_parallel(ParallelContext(tp_rank=0, tp_size=2)), pytest.raises(
            ValueError, match=r"'transformer.h.0.attn.c_attn' the style 'colwise', but it is "
                              r"a Conv1D, not an nn.Linear.*--tensor-parallel-size 1"):
        TransformersForCausalLM(config)


def test_heads_that_do_not_split_by_the_plan_are_refused():
    config = LlamaConfig(**DENSE)  # 4 query heads, 2 KV heads
    assert check_local_heads({0: (2, 1), 1: (4, 2)}, config, 2) == []  # split; kept whole
    (problem,) = check_local_heads({0: (2, 1), 1: (2, 2)}, config, 2)
    assert problem.startswith("layer 1 attends with 2 query and 2 KV heads on one of 2 ranks")
    assert problem.endswith("--tensor-parallel-size 1")


def test_a_planned_parameter_is_refused(monkeypatch):
    monkeypatch.setattr(GraniteConfig, "base_model_tp_plan",
                        {"layers.*.self_attn.q_proj.weight": "colwise"})
    with use_parallel(ParallelContext(tp_rank=0, tp_size=2)), pytest.raises(
            ValueError, match=r"the parameter 'model.layers.\*.self_attn.q_proj.weight'.*"
                              r"--tensor-parallel-size 1"):
        TransformersForCausalLM(CASES["granite"]())
