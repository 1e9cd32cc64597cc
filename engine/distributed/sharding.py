"""How a model's heads and rows divide over tensor-parallel ranks, and whether they can.

Rule: query heads split evenly; KV heads split evenly when there are at least as many as
ranks, otherwise each KV head is replicated over the `tp // num_kv_heads` ranks whose query
heads read it. Anything else is a config error naming the numbers and the flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeadSplit:
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # first KV head (of the full model) this rank holds


def split_heads(num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> HeadSplit:
    """This rank's share of the heads (call `check_tensor_parallel` first)."""
    local_q = num_heads // tp_size
    if num_kv_heads >= tp_size:
        local_kv = num_kv_heads // tp_size
        return HeadSplit(local_q, local_kv, tp_rank * local_kv)
    # Fewer KV heads than ranks: rank r's query heads all read KV head r // (tp / kv).
    return HeadSplit(local_q, 1, tp_rank // (tp_size // num_kv_heads))


def check_tensor_parallel(hf_config: Any, tp_size: int) -> list[str]:
    """Problems splitting this model over `tp_size` ranks (empty: it splits)."""
    if tp_size == 1:
        return []
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp_size:
        problems.append(f"num_attention_heads ({heads}) is not divisible by "
                        f"--tensor-parallel-size ({tp_size})")
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        problems.append(f"num_key_value_heads ({kv}) and --tensor-parallel-size ({tp_size}): "
                        "one must divide the other")
    if hf_config.intermediate_size % tp_size:
        problems.append(f"intermediate_size ({hf_config.intermediate_size}) is not divisible "
                        f"by --tensor-parallel-size ({tp_size})")
    return problems
