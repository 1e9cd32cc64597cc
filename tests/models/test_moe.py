"""Mixtral, Qwen2-MoE and Qwen3-MoE on random-weight checkpoints equal HF transformers through
the real `LLM`: several experts, top-k > 1, dense and sparse layers mixed (decoder_sparse_step,
mlp_only_layers), Qwen2-MoE's gated shared expert; greedy tokens and prompt log-probabilities,
batched with chunked prefill, prefix caching on (a second pass hits the cache). Checkpoints
load with per-expert names (what transformers 5 saves) and with its fused 3-D expert tensors;
expert-parallel and tensor-parallel splits of one layer add up to the whole."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from engine import LLM
from engine.distributed import ParallelContext, use_parallel
from engine.engine_args import EngineArgs
from engine.models.layers.moe import FusedMoE
from platforms.kernels import MoERouting
from tests.models.test_phi3 import check_against_hf, make_prompts, save_random_model

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False, attn_implementation="eager")


def mixtral_config(vocab: int) -> transformers.PretrainedConfig:
    return transformers.MixtralConfig(vocab_size=vocab, intermediate_size=32,
                                      num_hidden_layers=2, num_local_experts=8,
                                      num_experts_per_tok=2, **COMMON)


def qwen2_moe_config(vocab: int) -> transformers.PretrainedConfig:
    return transformers.Qwen2MoeConfig(vocab_size=vocab, intermediate_size=96,
                                       moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48,
                                       num_hidden_layers=3, num_experts=8,
                                       num_experts_per_tok=3, norm_topk_prob=False,
                                       mlp_only_layers=[1], **COMMON)


def qwen3_moe_config(vocab: int) -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(vocab_size=vocab, intermediate_size=96,
                                       moe_intermediate_size=32, head_dim=16,
                                       num_hidden_layers=3, num_experts=16,
                                       num_experts_per_tok=4, norm_topk_prob=True,
                                       decoder_sparse_step=2, **COMMON)


CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config,
           "qwen3_moe": qwen3_moe_config}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_moe_matches_hf(name, tmp_path, smollm2_tokenizer):
    vocab = len(smollm2_tokenizer)
    hf_model = save_random_model(CONFIGS[name](vocab), tmp_path, smollm2_tokenizer)
    llm = LLM(model=str(tmp_path), max_model_len=128, max_num_batched_tokens=24,
              num_kv_blocks=64, enable_prefix_caching=True)
    prompts = make_prompts(vocab, [5, 23, 47])
    check_against_hf(llm, hf_model, prompts, name)
    # Two full blocks of the third prompt come from the cache (prompt logprobs are not
    # recomputed for cached positions: tokens only).
    hits = [prompts[2][:40] + prompts[0], prompts[2]]
    check_against_hf(llm, hf_model, hits, f"{name} (prefix cache hits)",
                     check_prompt_logprobs=False)


def _save_fused(hf_model, directory, tokenizer) -> None:
    """The checkpoint as transformers 5 holds it in memory: 3-D fused expert tensors."""
    from safetensors.torch import save_file

    hf_model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_fused_expert_checkpoint_loads_the_same(name, tmp_path, smollm2_tokenizer,
                                                model_builder, prompt_runner):
    vocab = len(smollm2_tokenizer)
    per_expert, fused = tmp_path / "per-expert", tmp_path / "fused"
    hf_model = save_random_model(CONFIGS[name](vocab), per_expert, smollm2_tokenizer)
    _save_fused(hf_model, fused, smollm2_tokenizer)
    ids = torch.tensor(make_prompts(vocab, [19])[0])
    logits = []
    for directory in (per_expert, fused):
        model, backend = model_builder(EngineArgs(model=str(directory)).create_config().model)
        logits.append(prompt_runner(model, backend, ids, chunks=[7, 12]))
    with torch.no_grad():
        want = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[0], logits[1])


def test_checkpoint_missing_an_expert_is_refused(tmp_path, smollm2_tokenizer):
    from safetensors.torch import load_file, save_file

    save_random_model(mixtral_config(len(smollm2_tokenizer)), tmp_path, smollm2_tokenizer)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.w13"):
        LLM(model=str(tmp_path), max_model_len=64)


def test_config_without_architectures_uses_model_type(tmp_path, smollm2_tokenizer):
    save_random_model(qwen3_moe_config(len(smollm2_tokenizer)), tmp_path, smollm2_tokenizer)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["architectures"]
    path.write_text(json.dumps(config))
    assert EngineArgs(model=str(tmp_path)).create_config().model.architecture == \
        "Qwen3MoeForCausalLM"


# ---- one layer split over ranks (no collectives: the partial sums are added here) --------

def _layer(rank: int, size: int, expert_parallel: bool, full13, full2) -> FusedMoE:
    with use_parallel(ParallelContext(tp_rank=rank, tp_size=size)):
        layer = FusedMoE(8, 2, 32, 24, MoERouting(top_k=2, renormalize=True),
                         expert_parallel=expert_parallel)
    layer.w13.load_full(full13)
    layer.w2.load_full(full2)
    return layer


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_ranks_partial_sums_add_up_to_the_whole_layer(expert_parallel):
    gen = torch.Generator().manual_seed(0)
    full13, full2 = torch.randn(8, 48, 32, generator=gen), torch.randn(8, 32, 24, generator=gen)
    x, logits = torch.randn(9, 32, generator=gen), torch.randn(9, 8, generator=gen)
    whole = _layer(0, 1, False, full13, full2)
    parts = [_layer(r, 4 if expert_parallel else 2, expert_parallel, full13, full2)
             for r in range(4 if expert_parallel else 2)]
    if expert_parallel:
        assert [(p.expert_start, p.num_local_experts) for p in parts] == [(0, 2), (2, 2),
                                                                          (4, 2), (6, 2)]
        assert parts[1].w13.shape == (2, 48, 32)
    else:
        assert parts[1].w13.shape == (8, 24, 32) and parts[1].w2.shape == (8, 32, 12)
    with torch.no_grad():
        total = sum(p(x, logits) for p in parts)
        torch.testing.assert_close(total, whole(x, logits), rtol=1e-5, atol=1e-5)


def test_expert_parallel_layers_count_token_slots_per_global_expert():
    """Each EP rank counts every token's slots (routing is replicated), per global expert,
    in place across forwards; a TP-split layer counts nothing (the fused op routes inside).
    The buffer is no parameter and not in the state dict (never loaded or filled)."""
    gen = torch.Generator().manual_seed(1)
    full13, full2 = torch.randn(8, 48, 32, generator=gen), torch.randn(8, 32, 24, generator=gen)
    x, logits = torch.randn(9, 32, generator=gen), torch.randn(9, 8, generator=gen)
    parts = [_layer(r, 2, True, full13, full2) for r in range(2)]
    assert _layer(0, 2, False, full13, full2).expert_load is None
    with torch.inference_mode():
        for part in parts:
            part(x, logits)
            part(x[:4], logits[:4])
    ids = torch.topk(logits, 2).indices
    want = torch.bincount(ids.flatten(), minlength=8) + torch.bincount(ids[:4].flatten(),
                                                                       minlength=8)
    assert int(want.sum()) == (9 + 4) * 2
    for part in parts:
        assert part.expert_load.dtype == torch.int64
        assert torch.equal(part.expert_load, want)
        assert "expert_load" not in dict(part.named_parameters())
        assert "expert_load" not in part.state_dict()
