"""Per-step sampling metadata: the rows' sampling parameters turned into device tensors.

Rule: everything the sampler needs is built here once per step, on the logits' device, so the
sampler itself is a fixed sequence of batched tensor ops with no Python work per vocab entry.
Each optional feature (penalties, bias, min_tokens, top-k/p, min-p, logprobs) is `None` when no
row in the step uses it; the sampler reads `None` as "skip this stage entirely".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RequestSamplingState:
    """What the model runner knows about one row that samples this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # a list or a 1-D numpy array view
    output_token_ids: Sequence[int]  # tokens sampled so far and known on the host
    eos_token_id: Optional[int]
    # Tokens sampled by an earlier step still on the device (async scheduling); they count
    # for min_tokens and seeds. A row whose penalties need its history never has any.
    num_pending: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, output_index: int) -> int:
    """The generator seed for the draw of a seeded request's `output_index`-th token.

    Why (seed, index) and not one generator per request: the draw then depends only on the
    request's own seed and how many tokens it has produced, never on what else shares the batch,
    on the order rows come in, or on whether the request was preempted and recomputed (a
    stateful per-request generator would have advanced during the lost steps).
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ output_index)


def check_vocab_range(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError if `params` names a token id outside the model's vocabulary.

    The frontend should call this when a request is admitted; `SamplingMetadata.build` calls it
    too so that a bad id can never index out of bounds.
    """
    for token_id in params.logit_bias or {}:
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size}); "
                "change the logit_bias keys."
            )
    for token_id in params.stop_token_ids or ():
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"stop_token_ids entry {token_id} is outside the vocabulary [0, {vocab_size}); "
                "change stop_token_ids."
            )


def _token_counts(
    token_lists: list[Sequence[int]], vocab_size: int, to: _Target
) -> torch.Tensor:
    """[num_rows, vocab] float32 counts of each token id per row, via one scatter_add."""
    num_rows = len(token_lists)
    max_len = max((len(t) for t in token_lists), default=0)
    # Pad with an extra id `vocab_size` whose column is dropped afterwards.
    padded = torch.full((num_rows, max(max_len, 1)), vocab_size, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if len(tokens):
            padded[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    padded = to.upload(padded)
    counts = torch.zeros((num_rows, vocab_size + 1), dtype=torch.float32, device=to.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


@dataclass(frozen=True)
class _Target:
    """Where the metadata goes, and how: through page-locked memory without waiting where
    the platform has it (a blocking upload would wait for the step before, and async
    scheduling would lose its overlap)."""

    device: torch.device
    pin_memory: bool = False

    def tensor(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        return self.upload(torch.tensor(values, dtype=dtype))

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.pin_memory:
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)


@dataclass
class SamplingMetadata:
    """Batched sampling parameters of one step; tensors are [num_rows] unless noted."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    is_greedy: Optional[torch.Tensor]  # bool; None when all rows are greedy
    # float32; 1.0 on greedy rows so dividing is harmless; None when all rows are greedy
    temperature: Optional[torch.Tensor]
    top_k: Optional[torch.Tensor]  # long; vocab_size where a row has no top-k
    max_top_k: Optional[int]  # the largest k among rows that have one
    top_p: Optional[torch.Tensor]  # float32; 1.0 where a row has no top-p
    # Rows with a top-p and no top-k (they are sorted in full); None when there are none.
    top_p_sort_rows: Optional[torch.Tensor]
    min_p: Optional[torch.Tensor]  # float32; 0.0 where a row has no min-p
    # (row indices, token ids, bias values), one entry per (row, token) pair.
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # (row indices, token ids) to mask to -inf because the row is below min_tokens.
    min_tokens_mask: Optional[tuple[torch.Tensor, torch.Tensor]]
    repetition_penalty: Optional[torch.Tensor]  # float32; 1.0 = off
    repetition_seen: Optional[torch.Tensor]  # [num_rows, vocab] bool: in prompt or output
    frequency_penalty: Optional[torch.Tensor]  # float32
    presence_penalty: Optional[torch.Tensor]  # float32
    output_counts: Optional[torch.Tensor]  # [num_rows, vocab] float32 counts of output tokens
    # (row, generator seed) for each seeded random row; unseeded rows share one draw.
    row_seeds: list[tuple[int, int]]
    num_logprobs: list[Optional[int]]  # per row, `params.logprobs`
    max_num_logprobs: Optional[int]  # None when no row asks for logprobs

    @classmethod
    def build(
        cls, rows: list[RequestSamplingState], vocab_size: int, device: torch.device,
        pin_memory: bool = False,
    ) -> SamplingMetadata:
        """`pin_memory`: upload through page-locked memory without waiting (the platform's
        `capabilities.pinned_memory`)."""
        to = _Target(device, pin_memory)
        params = [r.params for r in rows]
        for p in params:
            check_vocab_range(p, vocab_size)
        greedy = [p.is_greedy for p in params]
        num_logprobs = [p.logprobs for p in params]
        asked = [k for k in num_logprobs if k is not None]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        all_greedy = not random_rows
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=len(random_rows) == len(rows),
            is_greedy=None if all_greedy else to.tensor(greedy, torch.bool),
            temperature=None if all_greedy else to.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                torch.float32),
            **_truncation(params, greedy, vocab_size, to),
            logit_bias=_logit_bias(params, to),
            min_tokens_mask=_min_tokens_mask(rows, to),
            **_penalties(rows, vocab_size, to),
            row_seeds=[
                (i, step_seed(params[i].seed, rows[i].num_output_tokens))
                for i in random_rows
                if params[i].seed is not None
            ],
            num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
        )


def _truncation(
    params: list[SamplingParams], greedy: list[bool], vocab_size: int, to: _Target
) -> dict:
    """top-k / top-p / min-p tensors, each None unless a random row uses it."""
    # Greedy rows never reach truncation, so their settings do not count.
    top_ks = [
        min(p.top_k, vocab_size) if p.top_k is not None and not g else vocab_size
        for p, g in zip(params, greedy, strict=True)
    ]
    top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
    min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
    limited = [k for k in top_ks if k < vocab_size]
    sort_rows = [i for i, (k, p) in enumerate(zip(top_ks, top_ps, strict=True))
                 if p < 1.0 and k >= vocab_size]
    return dict(
        top_k=to.tensor(top_ks, torch.long) if limited else None,
        max_top_k=max(limited) if limited else None,
        top_p=to.tensor(top_ps, torch.float32) if any(p < 1.0 for p in top_ps) else None,
        top_p_sort_rows=to.tensor(sort_rows, torch.long) if sort_rows else None,
        min_p=to.tensor(min_ps, torch.float32) if any(p > 0.0 for p in min_ps) else None,
    )


def _logit_bias(
    params: list[SamplingParams], to: _Target
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    row_ids: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            row_ids.append(row)
            token_ids.append(token_id)
            values.append(bias)
    if not row_ids:
        return None
    return (
        to.tensor(row_ids, torch.long),
        to.tensor(token_ids, torch.long),
        to.tensor(values, torch.float32),
    )


def _min_tokens_mask(
    rows: list[RequestSamplingState], to: _Target
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """EOS and stop ids of rows still below min_tokens.

    EOS is masked even with `ignore_eos`: ignore_eos only stops EOS from ending the request,
    while min_tokens promises that many tokens that are not EOS.
    """
    row_ids: list[int] = []
    token_ids: list[int] = []
    for row, r in enumerate(rows):
        if r.num_output_tokens >= r.params.min_tokens:
            continue
        blocked = r.params.all_stop_token_ids
        if r.eos_token_id is not None:
            blocked.add(r.eos_token_id)
        for token_id in sorted(blocked):
            row_ids.append(row)
            token_ids.append(token_id)
    if not row_ids:
        return None
    return (
        to.tensor(row_ids, torch.long),
        to.tensor(token_ids, torch.long),
    )


def _penalties(rows: list[RequestSamplingState], vocab_size: int, to: _Target) -> dict:
    """Penalty tensors; token counts are built only for the rows whose penalty is on."""
    params = [r.params for r in rows]
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_freq_pres = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    out: dict = dict(
        repetition_penalty=None,
        repetition_seen=None,
        frequency_penalty=None,
        presence_penalty=None,
        output_counts=None,
    )
    if not (use_rep or use_freq_pres):
        return out
    for r in rows:
        if r.num_pending and r.params.uses_output_history:
            raise RuntimeError("A row with penalties was sampled with tokens still pending; "
                               "the scheduler must wait for its batch (a bug).")
    # Rows without a penalty contribute no tokens: their counts stay zero and cost nothing.
    output_counts = _token_counts(
        [
            r.output_token_ids
            if r.params.repetition_penalty != 1.0
            or r.params.frequency_penalty != 0.0
            or r.params.presence_penalty != 0.0
            else ()
            for r in rows
        ],
        vocab_size,
        to,
    )
    if use_rep:
        prompt_counts = _token_counts(
            [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows],
            vocab_size,
            to,
        )
        out["repetition_penalty"] = to.tensor([p.repetition_penalty for p in params], torch.float32)
        out["repetition_seen"] = (prompt_counts > 0) | (output_counts > 0)
    if use_freq_pres:
        out["frequency_penalty"] = to.tensor([p.frequency_penalty for p in params], torch.float32)
        out["presence_penalty"] = to.tensor([p.presence_penalty for p in params], torch.float32)
        out["output_counts"] = output_counts
    return out
