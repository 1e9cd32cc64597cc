"""Tests of the batched sampler: each stage against a plain reference, and seeded determinism."""

from __future__ import annotations

import random
from typing import Optional

import pytest
import torch

from engine.sampling_params import SamplingParams
from engine.worker.sampler import (
    Sampler,
    _apply_top_k_top_p,
    apply_logits_processors,
    logprobs_entries,
)
from engine.worker.sampling_metadata import (
    RequestSamplingState,
    SamplingMetadata,
    step_seed,
)

CPU = torch.device("cpu")


def _row(
    output: Optional[list[int]] = None,
    prompt: Optional[list[int]] = None,
    eos: Optional[int] = None,
    **params: object,
) -> RequestSamplingState:
    return RequestSamplingState(
        params=SamplingParams(**params),
        prompt_token_ids=prompt if prompt is not None else [1, 2, 3],
        output_token_ids=output if output is not None else [],
        eos_token_id=eos,
    )


def _sample(logits: torch.Tensor, rows: list[RequestSamplingState]):
    meta = SamplingMetadata.build(rows, logits.shape[1], CPU)
    return Sampler()(logits.clone(), meta)


def _frequencies(logits_row: torch.Tensor, num_draws: int, **params: object) -> torch.Tensor:
    """Empirical distribution of `num_draws` unseeded draws from one row's logits."""
    torch.manual_seed(0)
    rows = [_row(**params) for _ in range(num_draws)]
    out = _sample(logits_row.expand(num_draws, -1).contiguous(), rows)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=logits_row.shape[0])
    return counts.float() / num_draws


def test_greedy_is_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    out = _sample(logits, [_row(temperature=0.0) for _ in range(8)])
    assert out.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_in_a_random_batch_still_take_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 30)
    rows = [_row(temperature=0.0 if i % 2 == 0 else 1.5, top_k=3) for i in range(6)]
    out = _sample(logits, rows)
    for i in range(0, 6, 2):
        assert out.sampled_token_ids[i] == int(logits[i].argmax())


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    freq = _frequencies(logits, 40000, temperature=0.7)
    expected = torch.softmax(logits / 0.7, dim=-1)
    # 40k draws: the standard error of each frequency is below 0.0025.
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_top_k_keeps_exactly_k_candidates() -> None:
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7, 0.0, -1.0, 1.0, 2.5])
    freq = _frequencies(logits, 4000, top_k=3)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 1, 2}
    expected = torch.softmax(logits[:3], dim=-1)
    assert torch.allclose(freq[:3], expected, atol=0.04)


def test_top_k_with_ties_keeps_exactly_k() -> None:
    logits = torch.zeros(4000, 10)
    torch.manual_seed(3)
    out = _sample(logits, [_row(top_k=4) for _ in range(4000)])
    assert len(set(out.sampled_token_ids)) == 4


def test_rows_with_different_top_k_each_keep_their_own_k() -> None:
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7, 2.6, 0.0, -1.0]).expand(3000, -1).contiguous()
    rows = [_row(top_k=2 if i % 3 == 0 else 4) if i % 3 != 2 else _row() for i in range(3000)]
    torch.manual_seed(8)
    sampled = _sample(logits, rows).sampled_token_ids
    assert set(sampled[0::3]) == {0, 1}
    assert set(sampled[1::3]) == {0, 1, 2, 3}
    assert len(set(sampled[2::3])) > 4  # the row without top-k is not truncated


def test_top_p_cuts_at_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(torch.nonzero(_frequencies(logits, 3000, top_p=0.7)).flatten().tolist()) == {0, 1}
    assert set(torch.nonzero(_frequencies(logits, 3000, top_p=0.85)).flatten().tolist()) == {
        0,
        1,
        2,
    }
    # The top token is always kept, however small top_p is.
    assert set(torch.nonzero(_frequencies(logits, 500, top_p=0.01)).flatten().tolist()) == {0}


def test_top_p_after_top_k_renormalizes_over_the_kept_tokens() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # After top_k=2 the probabilities are 4/7 and 3/7, so top_p=0.5 keeps only the first.
    freq = _frequencies(logits, 1000, top_k=2, top_p=0.5)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0}


def _reference_top_k_top_p(row: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    values, indices = row.sort(descending=True)
    if top_k is not None:
        values[top_k:] = float("-inf")
    probs = values.softmax(-1)
    kept = 0
    mass = 0.0
    # top_p == 1 keeps everything, even where the float sum reaches 1 early.
    while kept < len(values) and (top_p >= 1.0 or mass < top_p) and values[kept] > float("-inf"):
        mass += float(probs[kept])
        kept += 1
    out = torch.full_like(row, float("-inf"))
    out[indices[:kept]] = row[indices[:kept]]
    return out


def test_top_k_top_p_match_a_full_sort_reference_on_wide_and_narrow_rows() -> None:
    """Vocab 2000 > the partial top-k's candidates: flat rows take the full-sort fallback."""
    torch.manual_seed(9)
    vocab = 2000
    settings = [(None, 0.9), (None, 0.5), (5, 0.8), (400, 0.95), (30, 1.0), (None, 1.0)]
    rows, logits = [], []
    for scale in (0.05, 1.0, 8.0):  # flat (wide nucleus) to peaked (narrow nucleus)
        for top_k, top_p in settings:
            rows.append(_row(top_k=top_k, top_p=top_p))
            logits.append(torch.randn(vocab) * scale)
    batch = torch.stack(logits)
    meta = SamplingMetadata.build(rows, vocab, CPU)
    got = _apply_top_k_top_p(batch.clone(), meta)
    for i, r in enumerate(rows):
        expected = _reference_top_k_top_p(batch[i], r.params.top_k, r.params.top_p)
        kept_got = torch.isfinite(got[i])
        # Float rounding may move the nucleus edge by a token on flat rows; allow one.
        assert (kept_got ^ torch.isfinite(expected)).sum() <= 1, (i, r.params)
        assert torch.equal(got[i][kept_got], batch[i][kept_got])
        if r.params.top_k is not None:
            assert int(kept_got.sum()) <= r.params.top_k


def test_min_p_drops_tokens_below_the_scaled_maximum() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(torch.nonzero(_frequencies(logits, 3000, min_p=0.2)).flatten().tolist()) == {
        0,
        1,
        2,
    }
    assert set(torch.nonzero(_frequencies(logits, 3000, min_p=0.5)).flatten().tolist()) == {0, 1}


def _mixed_batch_row(i: int, vocab: int) -> RequestSamplingState:
    rng = random.Random(i)
    kind = i % 5
    output = [rng.randrange(vocab) for _ in range(rng.randrange(6))]
    if kind == 0:
        return _row(output, temperature=0.0)
    if kind == 1:
        return _row(output, temperature=1.0)  # unseeded
    if kind == 2:
        return _row(output, temperature=0.8, top_p=0.9, seed=1000 + i)
    if kind == 3:
        return _row(output, temperature=1.2, repetition_penalty=1.3, presence_penalty=0.5)
    return _row(output, temperature=0.9, top_k=20, min_p=0.05, seed=2000 + i, logprobs=2)


def test_seeded_row_is_identical_alone_and_in_a_batch_of_32() -> None:
    vocab = 500
    torch.manual_seed(4)
    target_logits = torch.randn(vocab)
    target_params = dict(temperature=0.9, top_k=50, seed=1234)
    alone: list[int] = []
    batched: list[int] = []
    output: list[int] = []
    for step in range(5):
        target = _row(list(output), **target_params)
        alone.append(_sample(target_logits.unsqueeze(0), [target]).sampled_token_ids[0])
        rows = [_mixed_batch_row(step * 32 + i, vocab) for i in range(32)]
        position = (7 * step + 3) % 32
        rows[position] = target
        logits = torch.randn(32, vocab)
        logits[position] = target_logits
        batched.append(_sample(logits, rows).sampled_token_ids[position])
        output.append(alone[-1])
    assert alone == batched


def test_seeded_row_repeats_after_recompute() -> None:
    """Preemption recomputes the same output index, which must draw the same token."""
    torch.manual_seed(5)
    logits = torch.randn(1, 1000)
    row = _row([4, 5, 6], seed=77)
    first = _sample(logits, [row]).sampled_token_ids
    torch.randn(100)  # advance the default generator, as other requests would
    assert _sample(logits, [row]).sampled_token_ids == first


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)
    tokens = {_sample(logits, [_row(seed=s)]).sampled_token_ids[0] for s in range(20)}
    assert len(tokens) > 10
    assert step_seed(1, 0) != step_seed(1, 1) != step_seed(2, 1)


def _reference_processors(logits: torch.Tensor, rows: list[RequestSamplingState]) -> None:
    """Straightforward per-row, per-token version of the penalty and bias stages."""
    for i, r in enumerate(rows):
        p = r.params
        for token_id, bias in (p.logit_bias or {}).items():
            logits[i, token_id] += bias
        if len(r.output_token_ids) < p.min_tokens:
            for token_id in p.all_stop_token_ids | ({r.eos_token_id} - {None}):
                logits[i, token_id] = float("-inf")
        for token_id in set(r.prompt_token_ids) | set(r.output_token_ids):
            value = logits[i, token_id]
            penalty = p.repetition_penalty
            logits[i, token_id] = value / penalty if value > 0 else value * penalty
        for token_id in set(r.output_token_ids):
            count = r.output_token_ids.count(token_id)
            logits[i, token_id] -= p.frequency_penalty * count + p.presence_penalty


def test_penalties_and_bias_match_a_per_row_reference() -> None:
    vocab = 40
    rng = random.Random(6)
    torch.manual_seed(6)
    rows = []
    for _ in range(12):
        rows.append(
            _row(
                output=[rng.randrange(vocab) for _ in range(rng.randrange(10))],
                prompt=[rng.randrange(vocab) for _ in range(rng.randrange(1, 10))],
                eos=rng.choice([None, 0]),
                repetition_penalty=rng.choice([1.0, 1.5, 0.7]),
                frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
                presence_penalty=rng.choice([0.0, 1.1, -0.6]),
                logit_bias=rng.choice([None, {3: 2.5, 7: -4.0}]),
                min_tokens=rng.choice([0, 5]),
                stop_token_ids=rng.choice([None, [9, 11]]),
                max_tokens=20,
            )
        )
    logits = torch.randn(12, vocab) * 3
    expected = logits.clone()
    _reference_processors(expected, rows)
    got = apply_logits_processors(logits.clone(), SamplingMetadata.build(rows, vocab, CPU))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.equal(got, logits)  # the random settings did change something


def test_logit_bias_steers_greedy_choice() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 0] = 5.0
    out = _sample(logits, [_row(temperature=0.0, logit_bias={7: 6.0}), _row(temperature=0.0)])
    assert out.sampled_token_ids == [7, 0]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]]).repeat(3, 1)
    rows = [
        _row([5], eos=0, temperature=0.0, min_tokens=3, stop_token_ids=[1]),
        _row([5], eos=0, temperature=0.0, min_tokens=3, ignore_eos=True),
        _row([5, 5, 5], eos=0, temperature=0.0, min_tokens=3, stop_token_ids=[1]),
    ]
    assert _sample(logits, rows).sampled_token_ids == [2, 1, 0]


def test_sampled_logprobs_come_from_raw_logits() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 25)
    rows = [
        _row(temperature=0.5, top_k=4, logit_bias={5: 3.0}, logprobs=3),
        _row(temperature=1.0),
        _row(temperature=0.0, repetition_penalty=2.0, logprobs=0),
    ]
    out = _sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.logprobs[1] is None
    for row, k in ((0, 3), (2, 0)):
        entries = out.logprobs[row]
        assert entries is not None and len(entries) == 1
        entry = entries[0]
        chosen = out.sampled_token_ids[row]
        assert entry.token_ids[0] == chosen and len(entry.token_ids) == k + 1
        assert entry.logprobs[0] == pytest.approx(float(raw[row, chosen]), abs=1e-6)
        assert entry.rank == int((raw[row] > raw[row, chosen]).sum()) + 1
        top_values, top_ids = raw[row].topk(k)
        assert entry.token_ids[1:] == top_ids.tolist()
        assert entry.logprobs[1:] == pytest.approx(top_values.tolist(), abs=1e-6)
        assert entry.logprobs[1:] == sorted(entry.logprobs[1:], reverse=True)


def test_prompt_logprobs_helper() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    entries = logprobs_entries(logits, torch.tensor([2, 2]), k=2)
    raw = torch.log_softmax(logits, dim=-1)
    assert [e.rank for e in entries] == [2, 1]
    assert entries[0].token_ids == [2, 1, 2]
    assert entries[1].token_ids == [2, 2, 3]
    assert entries[0].logprobs == pytest.approx(raw[0, [2, 1, 2]].tolist())
    assert logprobs_entries(logits, torch.tensor([0, 3]), k=0)[1].token_ids == [3]
    with pytest.raises(ValueError, match="k"):
        logprobs_entries(logits, torch.tensor([0, 3]), k=-1)


def test_out_of_vocab_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingMetadata.build([_row(logit_bias={10: 1.0})], 10, CPU)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingMetadata.build([_row(stop_token_ids=[-1])], 10, CPU)


def test_features_no_row_uses_are_skipped() -> None:
    meta = SamplingMetadata.build([_row(temperature=0.0), _row(temperature=0.0)], 10, CPU)
    assert meta.all_greedy and meta.top_k is None and meta.top_p is None
    assert meta.repetition_seen is None and meta.output_counts is None
    assert meta.logit_bias is None and meta.min_tokens_mask is None
    assert meta.max_num_logprobs is None


@pytest.mark.parametrize("vocab", [128256, 49152, 32000, 50257, 100])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_greedy_argmax_equals_argmax_with_ties(vocab, rows):
    from engine.worker.sampler import greedy_argmax

    gen = torch.Generator().manual_seed(vocab + rows)
    logits = torch.randn(rows, vocab, generator=gen)
    # Ties: the maximum repeated in later pieces, and a row that is all equal.
    for r in range(rows):
        top = logits[r].max() + 1.0
        cols = torch.randint(0, vocab, (3,), generator=gen)
        logits[r, cols] = top
    logits[0] = 0.5
    expected = logits.argmax(dim=-1)
    assert torch.equal(greedy_argmax(logits), expected)
    assert greedy_argmax(logits)[0].item() == 0  # all equal: the first index


def test_a_top_p_below_float32s_range_still_keeps_the_top_token() -> None:
    """2.2e-308 is a valid top_p (in (0, 1]) that float32 holds as 0; the nucleus is then
    the top token alone, never nothing (which sampled token 0 from an all -inf row)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for top_k in (None, 10):
        rows = [_row(top_p=2.2250738585072014e-308, top_k=top_k, temperature=1.0)
                for _ in range(3)]
        out = _sample(logits.clone(), rows)
        assert out.sampled.tolist() == logits.argmax(-1).tolist()
