"""Where a model named by the user lives on disk: a .gguf file, an HF directory, or a hub id.

Rule: a hub id is answered from the local cache first; the network is tried only when the
hub is not offline (HF_HUB_OFFLINE), and every miss is a ValueError that says how to fix it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files a model needs from the hub (weights, configs, tokenizer, chat template).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    directory: str  # the HF directory, or the folder holding the GGUF file
    gguf_file: Optional[str] = None  # absolute path of the .gguf file, when it is one


def is_hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate(name: str, revision: Optional[str] = None, flag: str = "--model") -> ModelSource:
    """Resolve a user-given model (or tokenizer) name to local files, or ValueError."""
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(
                f"{name!r} ({flag}) is a file but not a .gguf; pass a .gguf file or an HF "
                f"directory holding config.json."
            )
        return ModelSource(os.path.dirname(path), path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"Directory {name!r} ({flag}) has no config.json; pass an HF model directory "
                f"or a .gguf file."
            )
        return ModelSource(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(name):
        raise ValueError(
            f"Model path {name!r} ({flag}) does not exist; pass an existing HF directory, a "
            f".gguf file, or a hub id such as 'org/model'."
        )
    return ModelSource(_hub_snapshot(name, revision, flag))


def _hub_snapshot(repo_id: str, revision: Optional[str], flag: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True,
                                 allow_patterns=_HUB_PATTERNS)
    except Exception:  # noqa: BLE001 (any miss of the cache means: try the hub)
        pass
    how = (f"download it first (`hf download {repo_id}`) or pass a local path with {flag}")
    if is_hub_offline():
        raise ValueError(
            f"Hub model {repo_id!r} ({flag}) was not found locally and HF_HUB_OFFLINE is set; "
            f"{how}."
        )
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 (network, auth, not found: all the same advice)
        raise ValueError(
            f"Hub model {repo_id!r} ({flag}) was not found locally and could not be "
            f"downloaded ({type(exc).__name__}: {exc}); {how}."
        ) from exc
