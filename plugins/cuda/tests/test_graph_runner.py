"""CudaGraphRunner: size ladders, padding, static metadata and the capture hook on CPU; on a GPU, graph replays equal the eager forward for decode and mixed batches, and
greedy generation is the same with and without graphs.

Rule: the CPU tests drive the real buffers and the real CPU attention backend; only
capture and replay themselves need a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_cuda.graph import (
    AttentionBuffers,
    CudaGraphRunner,
    StaticDecodeInputs,
    capture_sizes,
    decode_sizes,
    mixed_sizes,
    padded_size,
)
from engine_cuda.platform import CudaPlatform

from engine.engine_args import EngineArgs
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec, CommonAttentionMetadata, GraphRunner
from platforms.testing import make_platform_config, write_tiny_llama

HAS_CUDA = CudaPlatform.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda)")


def tiny_config(tmp_path, **args):
    """The engine's config of a tiny Llama (for tests that run the engine's model runner)."""
    directory = write_tiny_llama(tmp_path / "tiny")
    return EngineArgs(model=str(directory), load_format="dummy", max_model_len=256,
                      **args).create_config()


# ---- sizes and padding ----
def test_capture_sizes_ladder():
    assert capture_sizes(512) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256,
                                  320, 384, 448, 512)
    assert capture_sizes(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(3) == (1, 2, 3)
    assert capture_sizes(0) == ()


def test_padded_size_is_the_smallest_that_holds_the_batch():
    sizes = capture_sizes(100)
    assert [padded_size(sizes, n) for n in (1, 3, 5, 17, 64, 65, 100)] == [
        1, 4, 8, 24, 64, 96, 100]
    assert padded_size(sizes, 101) is None


def test_sizes_follow_the_scheduler_limits():
    config = make_platform_config(max_num_seqs=40, max_num_batched_tokens=300)
    assert decode_sizes(config)[-1] == 40
    assert mixed_sizes(config)[-1] == 300
    big = make_platform_config(max_num_seqs=2000, max_num_batched_tokens=8192)
    assert decode_sizes(big)[-1] == 512 and mixed_sizes(big)[-1] == 512


def test_platform_gives_eager_under_enforce_eager_and_graphs_otherwise():
    def forward(ids, positions, metadata):
        return ids

    platform = CudaPlatform()
    eager = platform.graph_runner(forward, make_platform_config(enforce_eager=True))
    assert type(eager) is GraphRunner
    graphs = platform.graph_runner(forward, make_platform_config(max_num_seqs=8))
    assert isinstance(graphs, CudaGraphRunner) and graphs.decode_sizes == (1, 2, 4, 8)
    assert graphs.max_blocks == 256 // 16
    # Before capture (the profiling step, the first warm-up step) every call is eager.
    ids = torch.arange(5)
    assert graphs(ids, ids, object()) is ids


# ---- static decode inputs ----
def _decode_metadata(seq_lens: list[int], tables: list[list[int]], block_size: int = 16):
    """What a backend's metadata holds for a decode step: seq_lens, block_table, slots."""
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    last = torch.tensor(seq_lens) - 1
    slots = table[torch.arange(len(tables)), last // block_size].long() * block_size + (
        last % block_size)
    from types import SimpleNamespace

    return SimpleNamespace(seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                           block_table=table, slot_mapping=slots, max_query_len=1)


def test_fill_copies_the_step_and_pads_with_inert_requests():
    static = StaticDecodeInputs(max_batch=8, max_tokens=16, max_blocks=4,
                                device=torch.device("cpu"))
    static.fill(8, torch.arange(8) + 100, torch.arange(8) + 10,
                _decode_metadata([5] * 8, [[9, 9, 9, 9]] * 8))  # an earlier, fuller step
    meta = _decode_metadata([17, 3, 40], [[7, 2], [5], [1, 4, 6]])
    static.fill(4, torch.tensor([11, 12, 13]), torch.tensor([16, 2, 39]), meta)
    assert static.input_ids[:3].tolist() == [11, 12, 13]
    assert static.positions[:3].tolist() == [16, 2, 39]
    assert static.seq_lens[:4].tolist() == [17, 3, 40, 0]  # padding attends to nothing
    assert static.slot_mapping[:4].tolist() == [2 * 16 + 0, 5 * 16 + 2, 6 * 16 + 7, -1]
    assert static.block_table[:3, :3].tolist() == [[7, 2, 0], [5, 0, 0], [1, 4, 6]]
    # Rows past the padded size are not this step's business.
    assert static.seq_lens[4:].tolist() == [5] * 4
    assert static.query_start_loc.tolist() == list(range(9))


def test_captured_metadata_views_the_buffers_with_a_fixed_launch_shape():
    static = StaticDecodeInputs(8, 8, 4, torch.device("cpu"))
    common = static.common_metadata(4, max_model_len=64)
    assert (common.num_reqs, common.num_actual_tokens, common.max_query_len,
            common.max_seq_len) == (4, 4, 1, 64)
    assert common.block_table.shape == (4, 4)
    static.fill(4, torch.tensor([1]), torch.tensor([0]), _decode_metadata([3], [[2]]))
    assert common.seq_lens.tolist() == [3, 0, 0, 0]  # the same memory the graph reads
    assert common.slot_mapping.tolist() == [34, -1, -1, -1]
    assert common.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def test_attention_buffers_are_shared_per_shape_and_refuse_unknown_ones():
    buffers = AttentionBuffers(rows=32)
    q, kv = torch.randn(32, 4, 16), torch.randn(32, 2, 16)
    buffers.reserve(q, kv, kv)
    buffers.reserve(q, kv, kv)  # a second layer: same buffers
    view = buffers.view("q", q[:8])
    assert view.shape == (8, 4, 16) and view.data_ptr() == buffers.view("q", q).data_ptr()
    assert buffers.view("out", q[:8]).data_ptr() != view.data_ptr()
    with pytest.raises(RuntimeError, match="no static q buffer"):
        buffers.view("q", torch.randn(8, 3, 16))
    with pytest.raises(RuntimeError, match="no static k buffer"):
        buffers.view("k", torch.randn(33, 2, 16))


# ---- the capture hook: attention calls reach the runner, the model is not touched ----
def _decode_batch(n: int, device: torch.device, block_size: int = 16):
    qsl = torch.arange(n + 1, dtype=torch.int32)
    seq_lens = torch.arange(n, dtype=torch.int32) + 3
    table = torch.arange(1, n + 1, dtype=torch.int32)[:, None]
    common = CommonAttentionMetadata(
        num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, num_computed_tokens_cpu=seq_lens - 1,
        query_start_loc=qsl.to(device), seq_lens=seq_lens.to(device),
        block_table=table.to(device),
        slot_mapping=(table[:, 0].long() * block_size + seq_lens.long() - 1).to(device))
    return (torch.arange(n) + 7).to(device), (seq_lens - 1).long().to(device), common


def test_capture_hook_sees_every_attention_call_and_changes_nothing():
    """The runner is handed the platform's Triton backend (as the model runner hands it);
    while its hook is set, every attention call of the model goes to the runner, which (in
    the warm-up before a piecewise capture) sizes its buffers and attends exactly as the
    backend alone. Runs the real Triton kernels (in the interpreter on CPU)."""
    pytest.importorskip("triton")
    from engine_cuda.attention import TritonAttentionBackend

    from platforms.testing.graph import TinyDecoder

    config = make_platform_config(max_num_seqs=8, max_num_batched_tokens=64)
    shape = config.model
    backend = TritonAttentionBackend(AttentionSpec(shape.num_heads, shape.num_kv_heads,
                                                   shape.head_dim, torch.float32, 16))
    host = CudaPlatform() if HAS_CUDA else CpuPlatform()  # where the tensors live
    model = TinyDecoder(host, backend, shape, 16, torch.float32,
                        torch.Generator().manual_seed(0))
    ids, positions, common = _decode_batch(5, host.device())
    with torch.inference_mode():
        before = model(ids, positions, backend.build_metadata(common)).clone()
    graphs = CudaPlatform().graph_runner(model.forward, config, (backend,))
    assert graphs._hookable_backends() == [backend]
    calls = []
    backend.capture_hook = lambda *a: (calls.append(a[0]), graphs._on_attention(*a))[1]
    graphs._reserving = True
    try:
        with torch.inference_mode():
            after = model(ids, positions, backend.build_metadata(common))
    finally:
        backend.capture_hook = None
        graphs._reserving = False
    assert calls == [backend] * shape.num_layers
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    q = torch.empty(5, shape.num_heads, shape.head_dim, device=host.device())
    assert graphs._attn_buffers.view("q", q).shape == (5, shape.num_heads, shape.head_dim)


def test_a_forward_whose_attention_is_not_the_platforms_runs_eagerly():
    graphs = CudaPlatform().graph_runner(lambda ids, pos, md: ids, make_platform_config(),
                                         (CpuPlatform().attention_backend(
                                             AttentionSpec(4, 2, 32, torch.float32, 16)),))
    assert graphs._hookable_backends() == []


# ---- on a GPU ----
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_gpu_graph_replay_equals_eager(tmp_path, dtype):
    from platforms.testing import DEFAULT_BATCHES, check_graph_runner

    batches = (*DEFAULT_BATCHES,
               tuple((i % 10 * 3 + 2, 1) for i in range(33)),  # 33 decodes -> padded to 48
               ((0, 100), (20, 30), *((j, 1) for j in range(5, 25))),  # 150 mixed tokens
               ((0, 250), (0, 250), (3, 100)))  # 600 tokens: above the piecewise limit
    platform = CudaPlatform()
    worst = check_graph_runner(platform, dtype=dtype, batches=batches, num_blocks=128)
    assert worst < (1e-3 if dtype == torch.float32 else 5e-2)


@needs_gpu
def test_gpu_runner_replays_graphs_for_decode_and_pieces_for_mixed(tmp_path):
    from engine.engine_core.core import resolve_for_platform
    from engine.worker.model_runner import ModelRunner

    platform = CudaPlatform()
    config = tiny_config(tmp_path, num_kv_blocks=64, max_num_seqs=16,
                         max_num_batched_tokens=64)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                   dtype=torch.bfloat16))
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    runner.load_model()
    runner.initialize_kv_cache(64)
    runner.warm_up()
    graphs = runner.forward
    assert graphs.captured_sizes == (1, 2, 4, 8, 16)
    assert graphs.piecewise_sizes == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    # one piece per attention layer, plus the last one
    assert len(graphs._pieces[64]) == config.model.num_layers + 1
    replays = []
    for size, graph in graphs._decode_graphs.items():
        graph.replay = (lambda g, s: lambda: (replays.append(("decode", s)), g())[1])(
            graph.replay, size)
    ids, positions, metadata = runner.dummy_decode_batch(3)
    with torch.inference_mode():
        graphs(ids, positions, metadata)
    assert replays == [("decode", 4)]


def tiny_llama_with_tokenizer(directory, **overrides):
    """A config-only tiny Llama plus a word-level tokenizer ("t0".."t511"), all offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    write_tiny_llama(directory, **overrides)
    vocab = {f"t{i}": i for i in range(512)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t1",
                            unk_token="t0").save_pretrained(directory)
    return directory


def _generate(directory, enforce_eager: bool) -> list[list[int]]:
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(model=str(directory), load_format="dummy", dtype="float32", max_model_len=256,
              enforce_eager=enforce_eager, kv_cache_memory=64 << 20, max_num_seqs=32)
    # Prompts of different lengths: the first steps mix prefill and decode, then decode.
    prompts = [{"prompt_token_ids": list(range(2 + i, 10 + 7 * i))} for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outputs]


@needs_gpu
def test_gpu_greedy_generation_is_the_same_with_and_without_graphs(tmp_path):
    directory = tiny_llama_with_tokenizer(tmp_path / "gen")
    eager = _generate(directory, enforce_eager=True)
    graphs = _generate(directory, enforce_eager=False)
    same = sum(a == b for a, b in zip(eager, graphs, strict=True))
    assert same == len(eager), f"{same}/{len(eager)} completions equal"
