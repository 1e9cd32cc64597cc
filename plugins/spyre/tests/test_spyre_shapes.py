"""Warm-up shapes: parsing, the step shapes compiled from them, and picking one per step."""

import pytest
from engine_spyre.shapes import parse_shapes, pick_step_shape, step_shapes

from platforms.scheduling import StaticShape
from platforms.static_attention import StepShape


def test_parse_sorts_and_dedupes():
    assert parse_shapes(" 4x64x20, 1x128x8,4x64x20") == (StaticShape(1, 128, 8),
                                                          StaticShape(4, 64, 20))


@pytest.mark.parametrize("text, message", [
    ("4x64", "cannot read '4x64'"),
    ("4x60x20", "not a multiple of 64; use 64"),
    ("0x64x20", "batch_size must be at least 1"),
])
def test_parse_errors_name_the_entry_and_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shapes(text)


def test_each_warm_shape_gives_a_prefill_and_a_decode_step_shape():
    shapes = step_shapes((StaticShape(4, 64, 20), StaticShape(1, 128, 8)), block_size=16)
    # 64 + 20 = 84 tokens -> 6 blocks; 128 + 8 = 136 -> 9 blocks.
    assert set(shapes) == {StepShape(4, 64, 6), StepShape(4, 1, 6), StepShape(1, 128, 9),
                           StepShape(1, 1, 9)}
    assert [s.num_tokens for s in shapes] == sorted(s.num_tokens for s in shapes)


def test_pick_takes_the_smallest_holding_shape_or_none():
    shapes = step_shapes((StaticShape(4, 64, 20), StaticShape(1, 128, 8)), block_size=16)
    assert pick_step_shape(shapes, 1, 1, 3, 1) == StepShape(1, 1, 9)
    assert pick_step_shape(shapes, 3, 1, 6, 3) == StepShape(4, 1, 6)
    assert pick_step_shape(shapes, 2, 50, 4, 70) == StepShape(4, 64, 6)
    assert pick_step_shape(shapes, 1, 100, 7, 100) == StepShape(1, 128, 9)
    assert pick_step_shape(shapes, 2, 100, 7, 150) is None  # two long prompts: no shape
    assert pick_step_shape(shapes, 5, 1, 2, 5) is None  # batch too large
