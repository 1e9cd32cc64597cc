"""`engine bench latency` / `throughput --ceilings` end to end on the CPU platform, and the
roofline arithmetic they print.

Rule: the benchmarks run for real (a tiny random-weight model given as a config-only
directory with --load-format dummy, HF transformers as the peer); only sizes are small.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
from torch import nn

from engine.benchmarks import roofline
from engine.entrypoints.cli import main
from platforms.cpu.platform import CpuPlatform

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--roofline-copy-mib", "16", "--roofline-matmul-size", "128", "--num-kv-blocks", "64",
         "--max-model-len", "256", "--dtype", "float32"]


class _Tiny(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 8)  # 800 params
        self.layer = nn.Linear(8, 8, bias=False)  # 64
        self.lm_head = None if tied else nn.Linear(8, 100, bias=False)  # 800


def test_moe_experts_count_their_active_fraction_and_the_meta_model_builds():
    from engine.models.layers.moe import FusedMoE
    from platforms.kernels import MoERouting

    class _Moe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 8, bias=False)  # 64, read whole
            self.experts = FusedMoE(8, 2, 8, 4, MoERouting(top_k=2, renormalize=True))

    # 8 experts x (2 * 4 * 8 + 8 * 4) = 768 params, of which a token reads 2 / 8.
    assert roofline.non_embedding_params(_Moe()) == 64 + 768 // 4


def test_decode_weights_leave_out_only_an_untied_input_embedding():
    untied, tied = _Tiny(tied=False), _Tiny(tied=True)
    assert roofline.non_embedding_params(untied) == 64 + 800
    assert roofline.decode_weight_bytes(untied) == 4 * (64 + 800)
    assert roofline.non_embedding_params(tied) == 800 + 64  # the table is the head


def test_roofline_percent_for_times_and_rates():
    ceilings = roofline.Ceilings(copy_bytes_per_s=2e12, matmul_flop_per_s=8e14,
                                 copy_bytes=1, matmul_size=1)
    band = roofline.bandwidth_roofline(16 * 10**9, ceilings, tpot_s=0.010)
    assert band.ceiling == pytest.approx(8.0) and band.percent == pytest.approx(80.0)
    comp = roofline.compute_roofline(10**9, ceilings, tokens_per_s=2e5)
    assert comp.ceiling == pytest.approx(4e5) and comp.percent == pytest.approx(50.0)


def test_ceilings_are_measured_through_the_platform():
    ceilings = roofline.measure(CpuPlatform(), copy_bytes=8 << 20, matmul_size=128)
    assert ceilings.copy_bytes_per_s > 1e8  # any host copies 100 MB/s
    assert ceilings.matmul_flop_per_s > 1e7


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    spec = importlib.util.spec_from_file_location("mk", ROOT / "scripts/make_llama8b_config.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk.write_model_dir(
        str(tmp_path_factory.mktemp("tiny")), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=512, max_position_embeddings=512, rope_scaling=None,
        torch_dtype="float32")


def test_bench_latency_prints_tpot_peer_and_bandwidth_roofline(tiny_dir, capsys):
    assert main(["bench", "latency", tiny_dir, "--load-format", "dummy", "--input-len", "16",
                 "--output-len", "8", "--num-iters", "2", "--num-iters-warmup", "1",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert re.search(r"startup: [\d.]+ s \(load [\d.]+ s", out), out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert float(rows["engine"][2]) > 0 and float(rows["hf-transformers"][2]) > 0  # TPOT ms
    assert "TPOT ratio hf-transformers / engine" in out
    assert re.search(r"bandwidth \(time per output token\): roofline [\d.]+ ms, achieved "
                     r"[\d.]+ ms = [\d.]+% of the roofline", out), out


def test_bench_throughput_ceilings_and_hf_subset(tiny_dir, capsys):
    assert main(["bench", "throughput", tiny_dir, "--load-format", "dummy", "--num-prompts",
                 "6", "--input-len", "16", "--output-len", "4", "--hf-num-prompts", "2",
                 "--ceilings", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "hf-transformers runs the first 2 of 6 prompts" in out
    assert re.search(r"compute \(total tokens/s\): roofline [\d.]+ tok/s, achieved [\d.]+ "
                     r"tok/s = [\d.]+% of the roofline", out), out
    assert "non-embedding parameters:" in out


def test_a_config_only_directory_benchmarks_with_a_stand_in_tokenizer(tiny_dir, tmp_path,
                                                                      capsys):
    bare = tmp_path / "config-only"
    bare.mkdir()
    (bare / "config.json").write_text(Path(tiny_dir, "config.json").read_text())
    assert main(["bench", "latency", str(bare), "--load-format", "dummy", "--input-len", "8",
                 "--output-len", "3", "--num-iters", "1", "--no-hf-peer", "--no-ceilings",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "has no tokenizer: using a word-level stand-in" in out
    assert re.search(r"^ *engine +[\d.]+", out, re.M), out


def test_stand_in_tokenizer_has_one_token_per_id(tmp_path):
    from transformers import AutoTokenizer

    from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer

    tok = AutoTokenizer.from_pretrained(
        save_word_level_tokenizer(str(tmp_path), 300, bos_id=5, eos_id=299))
    assert len(tok) == 300 and tok.eos_token_id == 299 and tok.bos_token_id == 5
    assert tok.decode([7, 299]) == "<t7> </s>"


def test_bench_throughput_structured_json_times_the_workload_and_its_decoding(tiny_dir,
                                                                               capsys):
    pytest.importorskip("xgrammar")
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    assert main(["bench", "throughput", tiny_dir, "--load-format", "dummy", "--num-prompts",
                 "4", "--input-len", "8", "--output-len", "12", "--no-hf-peer",
                 "--structured-json", schema, "--structured-repeats", "2", *SMALL]) == 0
    out = capsys.readouterr().out
    for row in ("engine + json schema", "engine, same lengths",
                "engine + json schema, cached prompts", "engine, same lengths, cached prompts"):
        assert re.search(rf"^ *{re.escape(row)} +[\d.]+ ", out, re.M), (row, out)
    for what in ("the workload", r"cached prompts \(decoding\)"):
        assert re.search(rf"same output lengths\), {what}: \d+\.\d\d \([\d.]+-[\d.]+\), "
                         r"median of 2$", out, re.M), out
    assert re.search(r"first-seen schema [\d.]+ ms", out), out


def test_counted_model_for_workers_in_other_processes_is_built_on_meta(tmp_path):
    """With TP the workers hold the model elsewhere: the rooflines count a meta-device
    build of the same class (no backend argument since models bind attention later)."""
    import types

    import torch
    from transformers import LlamaConfig

    from engine.engine_args import EngineArgs

    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64).save_pretrained(tmp_path)
    from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer

    save_word_level_tokenizer(str(tmp_path), 100)
    config = EngineArgs(model=str(tmp_path), load_format="dummy", dtype="float32").create_config()
    llm = types.SimpleNamespace(core=types.SimpleNamespace(executor=object()),
                                config=types.SimpleNamespace(model=dataclasses.replace(
                                    config.model, dtype=torch.float32)))
    model = roofline.counted_model(llm)
    assert all(p.is_meta for p in model.parameters())
    assert roofline.non_embedding_params(model) > 0
