"""Spyre warm-up shapes and the padded step shapes compiled from them.

Rule: pure functions of the configuration. Every shape the device will ever run is derived here, from the
configured warm-up shapes alone, so the scheduler's constraint (`StaticBatching`) and the
graph runner's padding can never disagree.

`ENGINE_SPYRE_WARMUP_SHAPES` lists `BATCHxPROMPTxNEW` entries, comma separated, e.g.
`4x64x20,1x256x128`: up to BATCH requests with prompts of at most PROMPT tokens (a multiple
of 64, the device's prompt granularity), each generating at most NEW tokens.
"""

from __future__ import annotations

import os
import re

from platforms.scheduling import StaticBatching, StaticShape
from platforms.static_attention import StepShape
from platforms.util import cdiv

SHAPES_ENV = "ENGINE_SPYRE_WARMUP_SHAPES"
DEFAULT_SHAPES = "4x64x20"
PROMPT_MULTIPLE = 64  # prompt lengths the device compiles for are multiples of this
HOW_TO_CHANGE = f"add a warm-up shape to {SHAPES_ENV} (BATCHxPROMPTxNEW, comma separated)"

_ENTRY = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*")


def parse_shapes(text: str) -> tuple[StaticShape, ...]:
    """`"4x64x20,1x256x128"` -> shapes; ValueError naming the bad entry and the format."""
    shapes = []
    for entry in text.split(","):
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(
                f"{SHAPES_ENV}: cannot read {entry!r}; write BATCHxPROMPTxNEW entries separated "
                f"by commas, e.g. {DEFAULT_SHAPES},1x256x128."
            )
        batch, prompt, new = (int(g) for g in match.groups())
        if prompt % PROMPT_MULTIPLE:
            raise ValueError(
                f"{SHAPES_ENV}: prompt length {prompt} in {entry.strip()!r} is not a multiple of "
                f"{PROMPT_MULTIPLE}; use {(cdiv(prompt, PROMPT_MULTIPLE)) * PROMPT_MULTIPLE}."
            )
        shapes.append(StaticShape(batch_size=batch, prompt_len=prompt, new_tokens=new))
    return tuple(sorted(set(shapes)))


def configured_shapes() -> tuple[StaticShape, ...]:
    return parse_shapes(os.environ.get(SHAPES_ENV) or DEFAULT_SHAPES)


def constraints(shapes: tuple[StaticShape, ...]) -> StaticBatching:
    return StaticBatching(shapes, how_to_change=HOW_TO_CHANGE)


def step_shapes(shapes: tuple[StaticShape, ...], block_size: int) -> tuple[StepShape, ...]:
    """The prefill and the decode shape of each warm-up shape: every request's context fits
    `blocks` blocks (its longest sequence, prompt + new tokens)."""
    out = set()
    for s in shapes:
        blocks = cdiv(s.max_seq_len, block_size)
        out.add(StepShape(s.batch_size, s.prompt_len, blocks))
        out.add(StepShape(s.batch_size, 1, blocks))
    return tuple(sorted(out, key=lambda p: (p.num_tokens, p.blocks, p.batch)))


def pick_step_shape(
    candidates: tuple[StepShape, ...], num_reqs: int, max_query: int, max_blocks: int,
    num_tokens: int,
) -> StepShape | None:
    """The smallest compiled shape holding this step, or None."""
    for shape in candidates:  # sorted smallest first
        if (num_reqs <= shape.batch and max_query <= shape.query and max_blocks <= shape.blocks
                and num_tokens <= shape.num_tokens):
            return shape
    return None
