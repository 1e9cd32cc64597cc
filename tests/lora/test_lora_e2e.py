"""Multi-LoRA end to end through `LLM`: one generate call mixes four random peft adapters of
different ranks and targets with base-model requests, with two device slots (adapters swap
in and out), chunked prefill and prefix caching on; every request's greedy tokens and
logprobs equal HF + peft with that adapter merged (float32). Also the offline API's
refusals (flags, lora_request without enable_lora, an id reused for another path)."""

from __future__ import annotations

import pathlib
from typing import Optional

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.engine_args import EngineArgs
from tests.lora.conftest import random_hf_model, tiny_llama_config
from tests.lora.tiny_model import SMOLLM2_VOCAB, make_adapters, make_tiny_llama

MAX_TOKENS = 6
RANKS = [4, 8, 16, 8]
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"],
           ["gate_proj", "up_proj", "down_proj"], ["o_proj", "k_proj", "up_proj"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-e2e")
    base = make_tiny_llama(root / "base")
    return base, make_adapters(base, root, RANKS, TARGETS)


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = list(prompt)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids.append(token)
    return tokens, logprobs


def test_mixed_adapters_equal_peft_merged_models(models):
    base, adapters = models
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(5, SMOLLM2_VOCAB, (40,), generator=generator).tolist()
    prompts: list[list[int]] = []
    loras: list[Optional[int]] = []  # index into adapters, None: the base model
    for i in range(12):
        which = None if i % 5 == 0 else i % 4
        tail = torch.randint(5, SMOLLM2_VOCAB, (3 + 7 * (i % 3),), generator=generator)
        # Every prompt shares 40 tokens (2.5 blocks) with all others: a hit across adapters
        # would show as wrong tokens.
        prompts.append(shared + tail.tolist())
        loras.append(which)
    prompts.append(list(prompts[1]))  # the same prompt and adapter again: a real hit
    loras.append(loras[1])
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2,
              max_num_batched_tokens=32, max_num_seqs=6, enable_prefix_caching=True,
              num_kv_blocks=128, max_model_len=256, dtype="float32")
    requests = [None if w is None else LoRARequest(f"a{w}", w + 1, str(adapters[w][0]))
                for w in loras]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                           use_tqdm=False, lora_request=requests)
    hf_base = random_hf_model(_base_config())
    num_differ = 0
    for prompt, which, output in zip(prompts, loras, outputs, strict=True):
        reference = hf_base if which is None else adapters[which][1]
        tokens, logprobs = hf_greedy(reference, prompt)
        completion = output.outputs[0]
        assert list(completion.token_ids) == tokens, (which, output.request_id)
        got = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        assert got == pytest.approx(logprobs, abs=1e-4)
        num_differ += which is not None and tokens != hf_greedy(hf_base, prompt)[0]
    assert num_differ >= 6  # the adapters change the answers (10 adapter requests)
    assert llm.get_metrics()["prefix_cache_hits"] > 0
    llm.shutdown()


def _base_config():
    config = tiny_llama_config()
    config.vocab_size = SMOLLM2_VOCAB
    config.max_position_embeddings = 512
    return config


def test_base_reference_matches_the_saved_base(models):
    """The test's base reference is the model on disk (same seed, same config)."""
    from transformers import AutoModelForCausalLM

    base, _ = models
    saved = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rebuilt = random_hf_model(_base_config())
    for (name, a), (_, b) in zip(saved.named_parameters(), rebuilt.named_parameters()):
        assert torch.equal(a, b), name


# ---- the offline API's refusals ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"max_loras": 0}, "--max-loras"),
    ({"max_lora_rank": 0}, "--max-lora-rank"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "--max-cpu-loras"),
])
def test_lora_limits_are_checked(models, kwargs, flag):
    base, _ = models
    with pytest.raises(ValueError, match=flag):
        EngineArgs(model=str(base), enable_lora=True, **kwargs).create_config()


def test_lora_config_defaults_and_off(models):
    base, _ = models
    assert EngineArgs(model=str(base)).create_config().lora is None
    config = EngineArgs(model=str(base), enable_lora=True, max_loras=3).create_config().lora
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (3, 16, 3)
    with pytest.raises(ValueError, match="--enable-lora"):
        EngineArgs(model=str(base), max_loras=2).create_config()


def test_lora_request_needs_enable_lora_and_one_path_per_id(models):
    base, adapters = models
    first, second = str(adapters[0][0]), str(adapters[1][0])
    plain = LLM(str(base), num_kv_blocks=32, max_model_len=256)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate("Hi", lora_request=LoRARequest("a", 1, first), use_tqdm=False)
    plain.shutdown()
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, num_kv_blocks=32,
              max_model_len=256)
    params = SamplingParams(max_tokens=2)
    llm.generate("Hi", params, lora_request=LoRARequest("a", 1, first), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id 1 is already used"):
        llm.generate("Hi", params, lora_request=LoRARequest("b", 1, second), use_tqdm=False)
    with pytest.raises(ValueError, match="rank 16, above --max-lora-rank 8"):
        llm.generate("Hi", params, lora_request=LoRARequest("c", 3, str(adapters[2][0])),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="2 lora_request entries for 1 prompts"):
        llm.generate("Hi", params, lora_request=[None, None], use_tqdm=False)
    # chat takes it too, and the engine.lora.request import path works as vLLM's does.
    from engine.lora.request import LoRARequest as VLLMStyle

    out = llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False,
                   lora_request=VLLMStyle("a", 1, first))
    assert len(out[0].outputs[0].token_ids) == 2
    llm.shutdown()


def test_adapter_target_missing_from_the_model_is_refused_by_name(models, tmp_path):
    import json
    import shutil

    base, adapters = models
    directory = pathlib.Path(tmp_path / "odd")
    shutil.copytree(adapters[0][0], directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "w_gate"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    llm = LLM(str(base), enable_lora=True, num_kv_blocks=32, max_model_len=256)
    with pytest.raises(ValueError, match="'w_gate'"):
        llm.generate("Hi", lora_request=LoRARequest("odd", 1, str(directory)), use_tqdm=False)
    llm.shutdown()
