"""The model's tokenizer, as a transformers tokenizer, from an HF directory, hub id or GGUF.

Rule: start fast. Converting a GGUF vocabulary to a tokenizer takes seconds, so the result is
saved once under `$ENGINE_CACHE_DIR/tokenizers/<key>` (default `~/.cache/engine`), keyed by
the GGUF's path, size and mtime, and later starts load the saved tokenizer.json directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from engine.config import ModelConfig

CACHE_ENV = "ENGINE_CACHE_DIR"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "engine")


def load_tokenizer(model_config: ModelConfig) -> Any:
    """A transformers tokenizer with the config's chat template applied."""
    from transformers import AutoTokenizer

    source = model_config.tokenizer
    if source.endswith(".gguf") and os.path.isfile(source):
        tokenizer = _gguf_tokenizer(source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model_config.revision,
            trust_remote_code=model_config.trust_remote_code)
    if model_config.chat_template is not None:
        tokenizer.chat_template = model_config.chat_template
    return tokenizer


def _gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    cached = os.path.join(cache_root(), "tokenizers", _gguf_key(path))
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path))
    _save_atomically(tokenizer, cached)
    return tokenizer


def _gguf_key(path: str) -> str:
    stat = os.stat(path)
    raw = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _save_atomically(tokenizer: Any, target: str) -> None:
    """Save to a temporary folder and rename it, so a concurrent start never reads half a
    tokenizer; a failure to cache (read-only home) only costs the next start time."""
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def eos_token_ids(model_config: ModelConfig, tokenizer: Optional[Any] = None) -> list[int]:
    """End-of-sequence ids: generation_config.json's `eos_token_id` (int or list), then the
    HF config's, then the tokenizer's; deduplicated, in that order."""
    ids: list[int] = []
    directory = (os.path.dirname(model_config.model) if model_config.gguf_file
                 else model_config.model)
    path = os.path.join(directory, "generation_config.json")
    if model_config.gguf_file is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            ids += _as_list(json.load(f).get("eos_token_id"))
    ids += _as_list(getattr(model_config.hf_config, "eos_token_id", None))
    if tokenizer is not None:
        ids += _as_list(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def eos_token_id(model_config: ModelConfig, tokenizer: Optional[Any] = None) -> Optional[int]:
    """The one end-of-sequence id the request messages carry: the tokenizer's own (for
    instruct models, the end-of-turn token the chat template emits), else the first of
    `eos_token_ids`; None when the model names none."""
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tokenizer_eos is not None:
        return int(tokenizer_eos)
    ids = eos_token_ids(model_config)
    return ids[0] if ids else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
