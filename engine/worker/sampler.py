"""The batched sampler: one call per step turns the sampling rows' logits into token ids.

Rule: every stage is one batched tensor op over all rows, and a stage no row uses is skipped.
Order of processing (each stage sees the output of the one before):

1. logprobs are taken from the RAW logits (log_softmax before any stage below). Why: they then
   describe the model's own distribution, which is what OpenAI-style clients compare across
   requests; the processed distribution depends on settings (temperature, top-k, bias) and
   would put -inf on every truncated token.
2. logit_bias is added.
3. min_tokens: while a row has fewer outputs than min_tokens, its EOS (even with ignore_eos)
   and its stop_token_ids are set to -inf.
4. repetition penalty over prompt + output tokens: positive logits divided by the penalty,
   negative ones multiplied.
5. frequency and presence penalties over output tokens only (OpenAI semantics):
   logit -= frequency * count + presence * (count > 0).
6. greedy rows take the argmax of these processed logits.
7. temperature, 8. top-k, 9. top-p, 10. min-p, 11. sample.

Sampling uses the exponential trick: token = argmax(probs / q) with q ~ Exp(1) per vocab entry,
which draws exactly from `probs` without a cumulative sum. A seeded row gets its own q from a
generator seeded by (seed, output index), so its tokens do not depend on the batch or on
preemption; unseeded rows share one draw from the default generator, which is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.messages.core import LogprobsEntry
from engine.worker.sampling_metadata import SamplingMetadata

_MIN_EXPONENTIAL = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class LogprobsTensors:
    """Logprob entries not read yet: per row, the token asked about then the top-k (`ids`,
    `values`: [rows, 1 + k]), and that token's rank (`ranks`: [rows]). Reading them waits
    for the device, so a step hands them over still on it (`to_host` starts the copy)."""

    ids: torch.Tensor
    values: torch.Tensor
    ranks: torch.Tensor

    def to_host(self, pin_memory: bool) -> LogprobsTensors:
        """Host copies: without waiting, through page-locked memory, where there is any."""
        if not pin_memory:
            return LogprobsTensors(self.ids.cpu(), self.values.cpu(), self.ranks.cpu())

        def copy(t: torch.Tensor) -> torch.Tensor:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        return LogprobsTensors(copy(self.ids), copy(self.values), copy(self.ranks))

    def entries(self) -> list[LogprobsEntry]:
        return [
            LogprobsEntry(token_ids=ids, logprobs=values, rank=rank)
            for ids, values, rank in zip(self.ids.tolist(), self.values.tolist(),
                                         self.ranks.tolist(), strict=True)
        ]


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [num_rows] int64 on the logits' device; read it when needed
    # The sampled tokens' logprobs, k = the largest any row asked for (None: no row did),
    # and each row's own k (None: that row asked for none).
    logprob_tensors: Optional[LogprobsTensors]
    num_logprobs: list[Optional[int]]

    @property
    def sampled_token_ids(self) -> list[int]:
        """One token id per row (waits for the device)."""
        return self.sampled.tolist()

    @property
    def logprobs(self) -> Optional[list[Optional[list[LogprobsEntry]]]]:
        """Per row [entry] where that row asked, else None (waits for the device)."""
        if self.logprob_tensors is None:
            return None
        return row_logprobs(self.logprob_tensors.entries(), self.num_logprobs)


class Sampler:
    """Stateless; one instance serves every step."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [num_rows, vocab] float32, modified in place."""
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        )
        apply_logits_processors(logits, meta)
        if meta.all_greedy:
            sampled = greedy_argmax(logits)
        else:
            sampled = _sample_random(logits, meta)
        tensors = None
        if raw_logprobs is not None:
            assert meta.max_num_logprobs is not None
            tensors = _logprob_tensors(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled=sampled, logprob_tensors=tensors,
                             num_logprobs=meta.num_logprobs)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (first maximum on ties), in two stages: a [rows, vocab] argmax is
    one reduction per row, which leaves a device all but idle at batch 1 (27.7 us for a
    128k vocabulary on an H100); cutting each row into `chunks` pieces reduces them all in
    parallel, then picks the best piece (5 us there). Ties still go to the first index: the
    first maximum of the first piece that holds one."""
    rows, vocab = logits.shape
    chunks = next((c for c in (256, 128, 64, 32) if vocab % c == 0 and vocab // c >= 64), 1)
    if chunks == 1 or rows > 16:  # enough rows to fill the device: one reduction is best
        return logits.argmax(dim=-1)
    values, index = logits.reshape(rows, chunks, vocab // chunks).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)  # [rows, 1]: first piece with the maximum
    return (best * (vocab // chunks) + index.gather(1, best)).squeeze(1)


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Stages 2-5 (bias, min_tokens, penalties), in place; returns `logits`."""
    if meta.logit_bias is not None:
        rows, token_ids, values = meta.logit_bias
        logits.index_put_((rows, token_ids), values, accumulate=True)
    if meta.min_tokens_mask is not None:
        rows, token_ids = meta.min_tokens_mask
        # The value is made on the device: a Python scalar would be uploaded with a blocking
        # copy, which waits for the step in flight.
        logits.index_put_((rows, token_ids), logits.new_full((), float("-inf")))
    if meta.repetition_penalty is not None:
        assert meta.repetition_seen is not None  # built together
        penalty = meta.repetition_penalty.unsqueeze(1)  # [num_rows, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        torch.where(meta.repetition_seen, penalized, logits, out=logits)
    if meta.output_counts is not None:
        assert meta.frequency_penalty is not None and meta.presence_penalty is not None
        counts = meta.output_counts
        logits -= meta.frequency_penalty.unsqueeze(1) * counts
        logits -= meta.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Token ids for all rows: argmax on greedy rows, a random draw on the others. [num_rows]"""
    assert meta.temperature is not None  # built whenever a row samples at random
    greedy = None if meta.all_random else greedy_argmax(logits)
    logits.div_(meta.temperature.unsqueeze(1))
    logits = _apply_top_k_top_p(logits, meta)
    probs = torch.softmax(logits, dim=-1)
    if meta.min_p is not None:
        threshold = meta.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    sampled = probs.div_(_exponential_noise(probs, meta)).argmax(dim=-1)
    if greedy is not None:
        assert meta.is_greedy is not None
        sampled = torch.where(meta.is_greedy, greedy, sampled)
    return sampled


def _exponential_noise(probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[num_rows, vocab] Exp(1) draws; seeded rows are overwritten with their own draw."""
    # -log(u) of a uniform draw: several times faster than exponential_() on CPU. u == 0
    # gives q == inf, which only drops that one token from that one draw; the clamp guards
    # generators that return u == 1, where q == 0 would turn a zero probability into 0/0.
    u = torch.empty_like(probs).uniform_()
    for row, seed in meta.row_seeds:
        generator = torch.Generator(device=probs.device).manual_seed(seed)
        u[row].uniform_(generator=generator)
    return u.log_().neg_().clamp_min_(_MIN_EXPONENTIAL)


def _apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Logits with everything outside each row's top-k and nucleus set to -inf.

    Exactly k tokens survive top-k. Top-p then keeps the fewest highest tokens whose mass
    (renormalized over the top-k survivors when the row has a top-k) reaches top_p; the top
    token always stays. Rows with a top-k take a partial top-k (k entries cost a fraction of
    a sort); rows with only a top-p are sorted in full. Why not cut those to a few hundred
    candidates too: whether the candidates hold the whole nucleus is only known on the
    device, and asking would make the host wait for the step, which async scheduling must
    never do. Which path a row takes depends only on its own parameters.
    """
    if meta.top_k is None and meta.top_p is None:
        return logits
    result = logits
    if meta.top_k is not None:
        assert meta.max_top_k is not None
        has_top_k = meta.top_k < logits.shape[1]
        values, indices = logits.topk(meta.max_top_k, dim=-1)  # sorted, descending
        positions = torch.arange(values.shape[1], device=logits.device)
        values.masked_fill_(positions >= meta.top_k.unsqueeze(1), float("-inf"))
        if meta.top_p is not None:
            probs = values.softmax(-1)  # over the top-k survivors
            cumulative = probs.cumsum(dim=-1)
            cut = (cumulative - probs >= meta.top_p.unsqueeze(1)) & (meta.top_p < 1.0).unsqueeze(1)
            cut[:, 0] = False  # the top token stays (a top_p below float32's range is 0)
            values.masked_fill_(cut, float("-inf"))
        kept = torch.full_like(logits, float("-inf")).scatter_(1, indices, values)
        result = torch.where(has_top_k.unsqueeze(1), kept, logits)
    if meta.top_p_sort_rows is not None:
        assert meta.top_p is not None
        rows = meta.top_p_sort_rows
        if result is logits:
            result = logits.clone()
        result[rows] = _top_p_full_sort(logits[rows], meta.top_p[rows])
    return result


def _top_p_full_sort(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p over the whole vocabulary for rows without top-k (same arithmetic as above)."""
    values, indices = logits.sort(dim=-1, descending=True)
    probs = logits.softmax(-1).gather(1, indices)
    # A token stays if the mass of the tokens above it is below top_p; the first always stays
    # (said outright: a top_p below float32's smallest number arrives as 0).
    cut = probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)
    cut[:, 0] = False
    values.masked_fill_(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, indices, values)


def row_logprobs(entries: list[LogprobsEntry], num_logprobs: list[Optional[int]]
                 ) -> list[Optional[list[LogprobsEntry]]]:
    """Each row's entry cut to its own k (the chosen token is element 0, then the top-k);
    None for rows that asked for none."""
    result: list[Optional[list[LogprobsEntry]]] = []
    for entry, k in zip(entries, num_logprobs, strict=True):
        if k is None:
            result.append(None)
            continue
        result.append(
            [LogprobsEntry(entry.token_ids[: k + 1], entry.logprobs[: k + 1], entry.rank)]
        )
    return result


def logprobs_entries(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[LogprobsEntry]:
    """One entry per row of `logits` [num_rows, vocab]: `token_ids[row]` first, then the top-k
    (see `logprob_tensors`; this reads them, waiting for the device)."""
    return logprob_tensors(logits, token_ids, k).entries()


def logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Per row of `logits` [num_rows, vocab]: `token_ids[row]` first, then the top-k, still on
    the device.

    Used for prompt logprobs, where `token_ids` are the next prompt tokens. Values are the
    log_softmax of `logits`; rank is 1 + the number of tokens with a strictly larger logprob.
    """
    if k < 0:
        raise ValueError(f"k (the number of top logprobs) must be non-negative, got {k}.")
    return _logprob_tensors(torch.log_softmax(logits.float(), dim=-1), token_ids, k)


def _logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
                     ) -> LogprobsTensors:
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.long).unsqueeze(1)
    chosen = logprobs.gather(1, token_ids)  # [num_rows, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
    return LogprobsTensors(torch.cat([token_ids, top_ids], dim=1),
                           torch.cat([chosen, top_values], dim=1), ranks)
