"""The incremental detokenizer: UTF-8 safety and equality with a full decode."""

import random

import pytest

from engine.outputs.detokenizer import IncrementalDetokenizer, special_token_ids

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was 3:45 p.m. on 2024-01-02!",
    "Emojis 😀🎉👩‍👩‍👧 split over several byte-level tokens 🦀.",
    "中文文本：你好，世界。日本語のテキストも。한국어도 있습니다.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code with   spaces\n\n",
    "Mixed: naïve café — “quotes” … ∑∫√ ½ and tabs\tand\r\nnewlines",
]


def stream(detok, ids):
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_never_emits_partial_chars(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = stream(detok, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_char_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode(" 😀", add_special_tokens=False)
    assert len(ids) >= 2  # byte-level BPE splits the emoji: the point of this test
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add_token(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add_token(ids[-1]) == " 😀"


def test_random_token_sequences_equal_full_decode(tokenizer):
    rng = random.Random(0)
    specials = special_token_ids(tokenizer)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    for _ in range(30):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tokenizer)
        assert "".join(stream(detok, ids)) == tokenizer.decode(ids)


def test_skip_special_tokens(tokenizer):
    hello, world = tokenizer.encode("hello world", add_special_tokens=False)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [hello, im_start, world, im_end]
    skipping = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    assert "".join(stream(skipping, ids)) == tokenizer.decode(ids, skip_special_tokens=True)
    assert skipping.text == "hello world"
    joined = IncrementalDetokenizer(
        tokenizer, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert "".join(stream(joined, ids)) == tokenizer.decode(ids, skip_special_tokens=False)
    spaced = IncrementalDetokenizer(
        tokenizer, skip_special_tokens=False, spaces_between_special_tokens=True
    )
    # Slow-tokenizer semantics: text segments and special tokens joined by one space.
    assert "".join(stream(spaced, ids)) == "hello <|im_start|>  world <|im_end|>"


def test_work_per_step_does_not_grow_with_output_length(tokenizer):
    """O(new tokens): the decoded window stays short however long the output gets."""
    decoded_lengths = []

    class CountingTokenizer:
        def __init__(self, inner):
            self._inner = inner
            self.all_special_ids = inner.all_special_ids
            self.added_tokens_decoder = inner.added_tokens_decoder

        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return self._inner.decode(ids, **kwargs)

    ids = tokenizer.encode(TEXTS[0] * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(CountingTokenizer(tokenizer))
    stream(detok, ids)
    assert len(ids) > 200
    assert max(decoded_lengths) <= 8
