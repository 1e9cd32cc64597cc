"""Scheduling constraints: which steps a platform can run, told to the scheduler.

Rule: torch-free (the scheduler imports it) and about shapes, never devices. A platform that
can run any step returns None from `Platform.scheduling_constraints` (the default); one
that runs only pre-compiled shapes returns a `StaticBatching`, and the scheduler then forms
only steps that fit one of its shapes. A request no shape can hold is refused when it is
added, with the shapes and the platform's own hint for changing them.

Example (a platform compiled for two shapes)::

    def scheduling_constraints(self, config):
        return StaticBatching(
            shapes=(StaticShape(batch_size=4, prompt_len=64, new_tokens=20),
                    StaticShape(batch_size=1, prompt_len=256, new_tokens=128)),
            how_to_change="set MY_WARMUP_SHAPES, e.g. 4x64x20,1x256x128",
        )
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, order=True)
class StaticShape:
    """One warmed-up shape: up to `batch_size` requests, prompts of at most `prompt_len`
    tokens prefilled whole in one step, then at most `new_tokens` generated each."""

    batch_size: int
    prompt_len: int
    new_tokens: int

    def __post_init__(self) -> None:
        for field_name in ("batch_size", "prompt_len", "new_tokens"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"StaticShape.{field_name} must be at least 1, got {self}.")

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + self.new_tokens

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len <= self.prompt_len and max_new_tokens <= self.new_tokens

    def __str__(self) -> str:
        return f"{self.batch_size}x{self.prompt_len}x{self.new_tokens}"


@dataclass(frozen=True)
class StaticBatching:
    """Steps only in warmed-up shapes, batch by batch.

    The scheduler forms a batch when nothing is running: the head of the waiting queue picks
    the smallest shape that holds it (by prompt length, then new tokens), and the requests
    behind it join in queue order while they fit that shape and its batch size (no skipping
    ahead). Their whole prompts run in one step (no chunking, no prefix-cache hits: a static
    prefill starts at position 0), then every member decodes one token per step until all
    have finished; only then is the next batch formed. KV-cache blocks for each member's
    longest possible sequence are free before it joins, so a batch is never preempted.
    """

    shapes: tuple[StaticShape, ...]
    how_to_change: str = ""  # the platform's own words: which flag or variable sets shapes

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("StaticBatching needs at least one shape.")

    def shape_for(self, prompt_len: int, max_new_tokens: int) -> Optional[StaticShape]:
        """The smallest shape holding one request of this size, or None."""
        fitting = [s for s in self.shapes if s.fits(prompt_len, max_new_tokens)]
        if not fitting:
            return None
        return min(fitting, key=lambda s: (s.prompt_len, s.new_tokens, -s.batch_size))

    def unfit_message(self, request_id: str, prompt_len: int, max_new_tokens: int) -> str:
        shapes = ", ".join(str(s) for s in self.shapes)
        hint = f" or {self.how_to_change}" if self.how_to_change else ""
        return (
            f"Request {request_id!r} (prompt {prompt_len} tokens, up to {max_new_tokens} new "
            f"tokens) fits none of the platform's warmed-up shapes (batch x prompt x new: "
            f"{shapes}); shorten the prompt or lower max_tokens{hint}."
        )
