"""Tensor parallelism for the transformers fallback, by the HF class's own TP plan
(`config.base_model_tp_plan` with the class's `_tp_plan`, as the instance's `tp_plan`
merges them; vLLM's Transformers backend does the same).

Rule: each `nn.Linear` the plan names `colwise` is swapped for our `ColumnParallelLinear`
(this rank's output rows and bias) and each `rowwise` one for our `RowParallelLinear` (this
rank's input columns, partial sums all-reduced through the engine's communicator, bias added
once after the sum), so the checkpoint's names still reach them and each loads only its
slice (`load_full`). HF attention reshapes with `-1` heads, so a sharded q/k/v projection
hands attention this rank's heads; the probe in `transformers_fallback` declares our
`Attention` layers from what it sees, and `check_local_heads` holds it to `heads / tp`.
Styles whose output is whole on every rank given a whole input (`colwise_gather_output`,
`rowwise_split_input`, `*_rep`, embeddings, `replicate`) keep their module whole on every
rank: the same numbers, no collective. Embeddings and the LM head are kept whole that way.
Any other style, a planned module (or parameter) that is not an `nn.Linear`, and fewer KV
heads than ranks are refused with the flag to change.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from engine.models.layers.linear import ColumnParallelLinear, RowParallelLinear

SHARDED_STYLES: dict[str, type[nn.Module]] = {"colwise": ColumnParallelLinear,
                                               "rowwise": RowParallelLinear}
# Output replicated from a replicated input: running the module whole on every rank is the
# same computation without the split and its collective.
WHOLE_STYLES = frozenset({"colwise_rep", "rowwise_rep", "colwise_gather_output",
                          "rowwise_split_input", "embedding_rowwise", "embedding_colwise",
                          "replicate", "replicated_with_grad_allreduce"})
_TP1 = "pass --tensor-parallel-size 1"


def tp_plan_problems(cls: type[nn.Module], hf_config: Any, tp_size: int) -> list[str]:
    """Why `cls` cannot be split over `tp_size` ranks by its plan (empty: it can), from the
    class and config alone (what needs the built model is checked in `shard_by_plan`)."""
    base_plan = getattr(hf_config, "base_model_tp_plan", None) or {}
    flag = f"--tensor-parallel-size {tp_size}"
    if not base_plan:
        return [f"{flag}: {cls.__name__} declares no tensor-parallel plan "
                f"(config.base_model_tp_plan is empty), so the fallback cannot split it; {_TP1}"]
    plan = {**(getattr(cls, "_tp_plan", None) or {}), **base_plan}
    problems = [f"{flag}: the TP plan of {cls.__name__} gives {name!r} the style {style!r}, "
                f"which the fallback does not implement (it implements "
                f"{', '.join(sorted(SHARDED_STYLES))} and keeps "
                f"{', '.join(sorted(WHOLE_STYLES))} whole); {_TP1}"
                for name, style in plan.items()
                if style not in SHARDED_STYLES and style not in WHOLE_STYLES]
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads is not None and kv_heads < tp_size:
        problems.append(f"{flag}: num_key_value_heads ({kv_heads}) is fewer than the ranks; "
                        "the fallback splits KV projections by the TP plan and does not "
                        f"replicate KV heads; pass --tensor-parallel-size {kv_heads} or less")
    return problems


def shard_by_plan(hf_model: nn.Module) -> None:
    """Swap every planned `nn.Linear` of `hf_model` for this rank's parallel linear, keeping
    the values it holds (so a probe forward before loading sees finite numbers)."""
    plan: dict[str, str] = dict(getattr(hf_model, "tp_plan", None) or {})
    model_name = type(hf_model).__name__
    modules = dict(hf_model.named_modules())
    for key, style in plan.items():
        if style in WHOLE_STYLES:
            continue
        if style not in SHARDED_STYLES:  # tp_plan_problems refused it; a plan set since
            raise ValueError(f"The TP plan of {model_name} gives {key!r} the style {style!r}, "
                             f"which the fallback does not implement; {_TP1}.")
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+"))
        names = [name for name in modules if pattern.fullmatch(name)]
        if not names and any(pattern.fullmatch(name) for name, _ in
                             hf_model.named_parameters()):
            raise ValueError(f"The TP plan of {model_name} gives the parameter {key!r} the "
                             f"style {style!r}; the fallback splits only nn.Linear modules; "
                             f"{_TP1}.")
        # A rule that matches nothing (a dense-MLP rule in a model whose layers are all
        # experts) is skipped, as transformers skips it.
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent), child, _parallel(modules[name], name, style,
                                                                     model_name))


def _parallel(linear: nn.Module, name: str, style: str, model_name: str) -> nn.Module:
    """`linear`'s slice on this rank as our column- or row-parallel linear."""
    if type(linear) is not nn.Linear:  # a subclass may compute more than x @ W.T + b
        raise ValueError(f"The TP plan of {model_name} gives {name!r} the style {style!r}, "
                         f"but it is a {type(linear).__name__}, not an nn.Linear; the "
                         f"fallback splits only nn.Linear; {_TP1}.")
    try:
        parallel = SHARDED_STYLES[style](linear.in_features, linear.out_features,
                                         bias=linear.bias is not None)
    except ValueError as e:
        raise ValueError(f"{name!r} ({style}) of {model_name}: {e}") from None
    parallel.weight.load_full(linear.weight.data)
    if linear.bias is not None:
        parallel.bias.load_full(linear.bias.data)
    return parallel


def check_local_heads(seen: dict[int, tuple[int, int]], hf_config: Any, tp_size: int
                      ) -> list[str]:
    """Each layer's (query heads, KV heads) that HF handed attention on this rank must be
    the model's heads split over the ranks (q/k/v colwise) or all of them (kept whole);
    anything else means the class builds its heads some other way."""
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if tp_size == 1 or heads is None:
        return []
    allowed = {(heads // tp_size, kv_heads // tp_size), (heads, kv_heads)}
    return [f"layer {layer_idx} attends with {q} query and {kv} KV heads on one of "
            f"{tp_size} ranks; the model has {heads} and {kv_heads} (the TP plan does not "
            f"split its heads evenly); {_TP1}"
            for layer_idx, (q, kv) in sorted(seen.items()) if (q, kv) not in allowed]
