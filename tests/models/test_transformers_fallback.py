"""The transformers fallback (--model-impl): HF classes we have no native class for (GPT-2
with learned absolute positions and per-layer attention scales, Granite with its attention,
residual, embedding and logit multipliers, OPT which scales q itself) give HF transformers' logits and greedy tokens on
random weights, over our paged cache in chunks, batched through `LLM` and through a real
`engine serve`; `--model-impl transformers` on Llama gives the native tokens; what the
fallback cannot run is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import torch
from transformers import BloomConfig, GPT2Config, GraniteConfig, LlamaConfig, OPTConfig

from engine import LLM, SamplingParams
from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer
from engine.engine_args import EngineArgs
from engine.entrypoints.args import add_engine_args, engine_args_from_namespace
from engine.models.layers.attention import Attention
from engine.models.loader.model_loader import load_model
from engine.models.registry import TRANSFORMERS_FALLBACK, get_model_class
from engine.models.transformers_fallback import TransformersForCausalLM
from platforms.cpu.platform import CpuPlatform
from tests.entrypoints.serve_fixtures import REPO_ROOT, ServerProcess, free_port
from tests.models.hf_reference import hf_greedy
from tests.models.test_model_logits_vs_hf import save_random_model

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
CASES = {
    # tied head; the scale of layer i is head_dim**-0.5 / (i + 1)
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128,
                               scale_attn_by_inverse_layer_idx=True, vocab_size=VOCAB,
                               bos_token_id=0, eos_token_id=1),
    # GQA 2; logits / logits_scaling happen in GraniteForCausalLM.forward, not the base model
    "granite": lambda: GraniteConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     attention_multiplier=0.2, embedding_multiplier=3.0,
                                     residual_multiplier=0.6, logits_scaling=2.5,
                                     tie_word_embeddings=False, **SMALL),
    # scales q in its projection and passes scaling=1.0; its forward calls model.decoder
    "opt": lambda: OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128,
                             num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=1,
                             **SMALL),
}
PROMPT_LENS = (37, 21, 5, 50)
MAX_TOKENS = 8
BLOCK_SIZE = 4


def _save(config, directory):
    hf_model = save_random_model(config, directory).eval()
    save_word_level_tokenizer(str(directory), VOCAB)
    return hf_model


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return str(directory), _save(CASES[request.param](), directory)


def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _bind_cpu_attention(model, num_blocks, block_size):
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.backend = CpuPlatform().attention_backend(layer.spec(torch.float32, block_size))
            layer.kv_cache = torch.zeros(layer.backend.kv_cache_shape(num_blocks))


def test_logits_equal_hf_in_chunks_over_a_paged_cache(model_dir):
    from tests.models import conftest

    directory, hf_model = model_dir
    config = EngineArgs(model=directory, dtype="float32").create_config()
    assert (config.model.architecture, config.model.model_impl) == (TRANSFORMERS_FALLBACK,
                                                                    "transformers")
    model = load_model(config.model, "cpu", torch.float32)
    assert isinstance(model, TransformersForCausalLM)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert [a.layer_idx for a in layers] == [0, 1]
    _bind_cpu_attention(model, 20, conftest.BLOCK_SIZE)
    ids = torch.tensor(_prompts()[3])  # 50 tokens in blocks 17, 3, 9, 0: not in order
    logits, start = [], 0
    with torch.no_grad():
        want = hf_model(ids[None]).logits[0]
        for size in (13, 1, 20, 16):
            metadata, positions = conftest.one_request_metadata(
                layers[0].backend, [17, 3, 9, 0], start, size)
            hidden = model(ids[start:start + size], positions, metadata)
            logits.append(model.compute_logits(hidden))
            start += size
    torch.testing.assert_close(torch.cat(logits), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_batched_chunked_greedy_equals_hf(model_dir, prefix_caching):
    directory, hf_model = model_dir
    prompts = _prompts()
    prompts.append(prompts[0][:30] + [7, 8])  # shares a prefix with the first
    llm = LLM(model=directory, dtype="float32", max_num_batched_tokens=16, max_num_seqs=3,
              block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf_model, prompt, MAX_TOKENS)
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        got_lp = [entry[t].logprob for entry, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(logprobs),
                                   rtol=1e-4, atol=1e-4)


def _start_server(model: str, *extra_args: str, timeout_s: float = 120.0) -> ServerProcess:
    """`engine serve <model>` on 127.0.0.1 (serve_fixtures.start_server serves SmolLM2)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="engine-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "engine.entrypoints.cli", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("ENGINE_API_KEY", None)
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log.name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"engine serve not healthy after {timeout_s} s:\n{server.log()}")


def test_serve_gives_hf_greedy_tokens(tmp_path):
    hf_model = _save(CASES["gpt2"](), tmp_path)
    server = _start_server(str(tmp_path), "--model-impl", "auto", "--dtype", "float32",
                           "--max-num-batched-tokens", "16", "--block-size", str(BLOCK_SIZE),
                           "--served-model-name", "gpt2", "--kv-cache-memory", "16m")
    try:
        prompts = _prompts()
        body = {"model": "gpt2", "prompt": prompts, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True, "logprobs": 1}
        response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        tokenizer_vocab = _vocab(tmp_path)
        for prompt, choice in zip(prompts, choices):
            tokens, _ = hf_greedy(hf_model, prompt, MAX_TOKENS)
            got = [tokenizer_vocab[t] for t in choice["logprobs"]["tokens"]]
            assert got == tokens
    finally:
        server.stop()


def _vocab(directory) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def test_model_impl_transformers_on_llama_gives_native_tokens(tmp_path):
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, **SMALL)
    _save(config, tmp_path)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    results = {}
    for impl in ("native", "transformers"):
        llm = LLM(model=str(tmp_path), dtype="float32", max_num_batched_tokens=16,
                  block_size=BLOCK_SIZE, max_model_len=128, model_impl=impl)
        assert llm.config.model.model_impl == impl
        results[impl] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    for native, fallback in zip(results["native"], results["transformers"]):
        assert list(fallback.token_ids) == list(native.token_ids)
        torch.testing.assert_close(
            torch.tensor([e[t].logprob for e, t in zip(fallback.logprobs, fallback.token_ids)]),
            torch.tensor([e[t].logprob for e, t in zip(native.logprobs, native.token_ids)]),
            rtol=1e-4, atol=1e-4)
    assert EngineArgs(model=str(tmp_path)).create_config().model.model_impl == "native"


def _config_dir(tmp_path, config):
    config.save_pretrained(tmp_path)
    save_word_level_tokenizer(str(tmp_path), VOCAB)
    return str(tmp_path)


def test_native_refuses_gpt2_and_names_the_way_out(tmp_path):
    directory = _config_dir(tmp_path, CASES["gpt2"]())
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*--model-impl auto or transformers"):
        EngineArgs(model=directory, model_impl="native").create_config()
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")  # the registry itself stays native-only


def test_a_class_without_the_attention_interface_is_refused(tmp_path):
    directory = _config_dir(tmp_path, BloomConfig(n_layer=2, hidden_size=64, n_head=4,
                                                  vocab_size=VOCAB))
    for impl in ("auto", "transformers"):
        with pytest.raises(ValueError, match=r"BloomForCausalLM.*_supports_attention_backend"):
            EngineArgs(model=directory, model_impl=impl).create_config()


def test_an_unknown_architecture_is_refused_in_auto(tmp_path):
    config = CASES["gpt2"]()
    config.architectures = ["FancyNewForCausalLM"]
    directory = _config_dir(tmp_path, config)
    with pytest.raises(ValueError, match=r"FancyNewForCausalLM.*not supported.*cannot run it "
                                         r"either.*no causal LM class"):
        EngineArgs(model=directory).create_config()


@pytest.mark.parametrize("flag,value", [("tensor_parallel_size", 2),
                                        ("pipeline_parallel_size", 2)])
def test_parallel_fallback_is_refused(tmp_path, flag, value):
    directory = _config_dir(tmp_path, CASES["gpt2"]())
    dashed = "--" + flag.replace("_", "-")
    with pytest.raises(ValueError, match=rf"GPT2LMHeadModel:\n.*{dashed} {value}"):
        EngineArgs(model=directory, **{flag: value}).create_config()


def test_model_impl_is_a_cli_flag_with_choices():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    parsed = engine_args_from_namespace(parser.parse_args(["--model-impl", "transformers"]),
                                        model="m")
    assert parsed.model_impl == "transformers"
    assert engine_args_from_namespace(parser.parse_args([]), model="m").model_impl == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-impl", "hf"])
