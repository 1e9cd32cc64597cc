"""A stand-in tokenizer for benchmarking a config-only model directory with dummy weights.

Rule: benchmarks feed random token ids and never read the text, but the engine still
detokenizes, so the stand-in has exactly one token per id of the model's vocabulary (`<t123>`,
word-level, built with `tokenizers`, nothing downloaded) and EOS/BOS at the config's ids.
Ids 32-126 are the printable ASCII characters themselves, so a grammar (JSON for the
structured-outputs benchmark) can be spelled in this vocabulary.
It is used only when the directory has no tokenizer of its own and none was given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


def _first_id(value: object) -> Optional[int]:
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def save_word_level_tokenizer(out_dir: str, vocab_size: int, bos_id: Optional[int] = None,
                              eos_id: Optional[int] = None, bos: str = "<s>",
                              eos: str = "</s>") -> str:
    """One token per id; `bos`/`eos` named at their ids when given. Saved as HF files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {i: name for i, name in ((bos_id, bos), (eos_id, eos))
                if i is not None and 0 <= i < vocab_size}
    vocab = {specials.get(i, chr(i) if 32 <= i <= 126 else f"<t{i}>"): i
             for i in range(vocab_size)}
    unk = "<t0>" if 0 not in specials else specials[0]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {}
    if bos_id in specials:
        names["bos_token"] = bos
    if eos_id in specials:
        names["eos_token"] = eos
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **names).save_pretrained(out_dir)
    return out_dir


def stand_in_for(model_dir: str) -> str:
    """A stand-in tokenizer directory for `model_dir`'s config.json (a new temp folder)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise ValueError(f"{model_dir}/config.json has no vocab_size; pass --tokenizer.")
    out = tempfile.mkdtemp(prefix="engine-stand-in-tokenizer-")
    shutil.copy(os.path.join(model_dir, "config.json"), out)  # --tokenizer wants a model dir
    return save_word_level_tokenizer(out, vocab_size, _first_id(config.get("bos_token_id")),
                                     _first_id(config.get("eos_token_id")))


def tokenizer_override(model: str, load_format: Optional[str],
                       tokenizer: Optional[str]) -> Optional[str]:
    """The `tokenizer` argument a benchmark should pass: a stand-in only for a dummy-weights
    run of a local directory without tokenizer files, where none was given."""
    if tokenizer is not None or load_format != "dummy" or not os.path.isdir(model):
        return tokenizer
    if has_tokenizer(model):
        return None
    path = stand_in_for(model)
    print(f"{model} has no tokenizer: using a word-level stand-in for its vocabulary ({path})")
    return path
