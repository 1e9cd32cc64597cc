"""Any HF causal LM we have no native class for, run by transformers' own modelling code
over our paged KV cache and scheduler (`--model-impl transformers`; vLLM's Transformers
backend does the same).

Rule: transformers computes everything but attention. The HF model is built with
`attn_implementation="engine_paged"`, an attention function registered with transformers'
`AttentionInterface`: HF applies its projections, norms and rotary, then hands q/k/v to that
function, which calls one of our `Attention` layers (declared here per decoder layer, so the
model runner finds and binds them like a native model's) and returns what HF expects. The
step's metadata reaches the function as a forward keyword argument (transformers passes
`**kwargs` down to attention), never through a global. HF keeps no cache (`use_cache=False`)
and builds no mask: an implementation outside its mask table gets none, and our backend
masks by the block tables. Logits come from the HF class's own forward over the hidden
states (its base model stood in for), so its head post-processing (soft-caps, logit scales)
is HF's code, not a copy. At load, a 3-token probe forward declares each layer's attention
from what HF passes it and checks that the split forward gives the class's own logits.

What is refused, with the flag to change: a class that does not route attention through the
interface (`_supports_attention_backend`), or fails the probe, encoder-decoder, multimodal
and non-causal models, models
with layers that are not attention (hybrid recurrent state would need a cache of its own),
and pipeline parallelism. Tensor parallelism follows the class's own TP plan
(`transformers_fallback_tp`); a class without one is refused for `--tensor-parallel-size`
above 1.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from engine.models.layers.attention import Attention, layer_sliding_windows
from engine.models.transformers_fallback_tp import (
    check_local_heads,
    shard_by_plan,
    tp_plan_problems,
)

ATTN_IMPLEMENTATION = "engine_paged"
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def hf_causal_lm_class(hf_config: Any) -> type[nn.Module]:
    """The transformers causal LM class to build: the first name of the config's
    `architectures` that transformers has as a causal LM, else (no list) its model_type's;
    ValueError when there is none."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lms = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(hf_config, "architectures", None) or []
    for name in architectures:
        if name in causal_lms and hasattr(transformers, name):
            return getattr(transformers, name)
    model_type = getattr(hf_config, "model_type", None)
    if not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    raise ValueError(
        f"transformers has no causal LM class named {architectures or model_type!r} "
        f"(transformers {transformers.__version__}; remote code is not run by the fallback)"
    )


def fallback_problems(hf_config: Any) -> list[str]:
    """Why the transformers fallback cannot run this config (empty: it can)."""
    try:
        cls = hf_causal_lm_class(hf_config)
    except ValueError as e:
        return [str(e)]
    problems = []
    if not getattr(cls, "_supports_attention_backend", False):
        problems.append(f"{cls.__name__} does not route its attention through transformers' "
                        "AttentionInterface (_supports_attention_backend is False)")
    if hf_config.get_text_config() is not hf_config:
        problems.append(f"{cls.__name__} is a multimodal model (its config holds a "
                        "text_config); the fallback runs text-only causal LMs")
    if getattr(hf_config, "is_encoder_decoder", False):
        problems.append(f"{cls.__name__} is an encoder-decoder model")
    layer_types = set(getattr(hf_config, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES
    if layer_types:
        problems.append(f"{cls.__name__} has layers that are not attention "
                        f"({', '.join(sorted(layer_types))}), whose state needs a cache of its own")
    return problems


def check_fallback(hf_config: Any, tensor_parallel_size: int = 1,
                   pipeline_parallel_size: int = 1) -> None:
    """ValueError naming what keeps the transformers fallback from running this model."""
    problems = fallback_problems(hf_config)
    if tensor_parallel_size > 1 and not problems:
        problems += tp_plan_problems(hf_causal_lm_class(hf_config), hf_config,
                                     tensor_parallel_size)
    if pipeline_parallel_size > 1:
        problems.append(f"--pipeline-parallel-size {pipeline_parallel_size}: the fallback "
                        "runs the whole model in one stage; pass --pipeline-parallel-size 1")
    if problems:
        raise ValueError("The transformers fallback (--model-impl transformers) cannot run "
                         f"{_architecture_name(hf_config)}:\n  " + "\n  ".join(problems)
                         + "\nRun an architecture with a native class instead "
                         "(--model-impl native lists them).")


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [1, num_heads, T, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, T, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, T, head_dim]
    attention_mask: Optional[torch.Tensor],  # always None: no mask for this implementation
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    attn_metadata: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # [1, T, num_heads, head_dim], no attention weights
    """transformers' attention-function signature over one of our `Attention` layers (the
    one `TransformersForCausalLM` attached to `module` as `paged_attn`)."""
    num_tokens = query.shape[2]
    if isinstance(attn_metadata, _Probe):
        attn_metadata.record(module, query, key, scaling, sliding_window, softcap)
        return query.new_zeros(1, num_tokens, query.shape[1], query.shape[-1]), None
    layer: Optional[Attention] = getattr(module, "paged_attn", None)
    if layer is None or attn_metadata is None:
        raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', None)})"
                           f" called the {ATTN_IMPLEMENTATION!r} attention without its engine "
                           "layer or the step's metadata.")
    q, k, v = (x[0].transpose(0, 1).reshape(num_tokens, -1) for x in (query, key, value))
    out = layer(q, k, v, attn_metadata)  # [T, num_heads * head_dim]
    return out.view(1, num_tokens, layer.num_heads, layer.head_dim), None


class _Probe:
    """Passed as `attn_metadata` through one tiny forward at build time: each attention call
    records what HF gives it (heads, head_dim, scale, window, soft-cap), so the engine layers
    are declared with HF's own run-time values (OPT scales q itself and passes 1.0; GPT-2
    divides by the layer index), and a class that does not pass the forward's keyword
    arguments down to attention is found before any request (its calls carry no probe)."""

    def __init__(self) -> None:
        self.calls: dict[int, tuple[nn.Module, tuple[Any, ...]]] = {}
        self.problems: list[str] = []

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               scaling: Optional[float], sliding_window: Optional[int],
               softcap: Optional[float]) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        name = type(module).__name__
        if layer_idx is None or layer_idx in self.calls:
            self.problems.append(f"{name} calls attention with layer_idx {layer_idx}, which "
                                 "does not name one decoder layer")
        elif getattr(module, "is_causal", True) is False:
            self.problems.append(f"{name} (layer {layer_idx}) is not causal attention")
        else:
            head_dim = query.shape[-1]
            scale = head_dim**-0.5 if scaling is None else float(scaling)
            self.calls[layer_idx] = (module, (query.shape[1], key.shape[1], head_dim, scale,
                                              sliding_window, softcap))


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class _GivenHidden(nn.Module):
    """Stands in for the base model when the HF class's own forward computes logits from
    hidden states we already have, so its head and every post-processing it does
    (Gemma's final soft-cap, Granite's and Cohere's logit scales, ...) are HF's code, not a
    copy. Any other attribute the forward reads is the real base model's."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self._base = (base,)  # a tuple: not a submodule, so no parameters appear twice

    def forward(self, *args: Any, inputs_embeds: torch.Tensor, **kwargs: Any) -> _HiddenOutput:
        return _HiddenOutput(inputs_embeds)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(self._base[0], name)
            # A forward that calls into the base (OPT: self.model.decoder) meets a stand-in.
            return _GivenHidden(value) if isinstance(value, nn.Module) else value


class _HiddenOutput:
    """The base model's output as the HF head code reads it: `last_hidden_state` or `[0]`;
    every other field (cache, attentions, ...) is None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.last_hidden_state

    def __getattr__(self, name: str) -> None:
        return None


class TransformersForCausalLM(nn.Module):
    """An HF `*ForCausalLM` (as `self.hf`) with one engine `Attention` per decoder layer."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from engine.distributed import parallel_context

        ctx = parallel_context()
        check_fallback(config, ctx.tp_size, ctx.pp_size)
        _register_attention()
        # transformers writes dtype and attn_implementation onto the config it builds from;
        # the engine's resolved config stays as it was.
        hf_config = copy.deepcopy(config)
        self.config = config
        # Built where the loader says (its device context) in its dtype (the default dtype).
        self.hf = hf_causal_lm_class(config)._from_config(
            hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.get_default_dtype())
        self.hf.eval()  # no dropout, in the probes below as in every step
        if ctx.tp_size > 1:
            shard_by_plan(self.hf)
        self._attach_attention_layers(config, ctx.tp_size)
        base = self.hf.base_model
        head = copy.copy(self.hf)  # the same modules, with the base model stood in for
        head._modules = dict(self.hf._modules)
        head._modules[self.hf.base_model_prefix] = _GivenHidden(base)
        object.__setattr__(self, "_head", head)  # outside the module tree: no second copy
        self._check_head()

    def _attach_attention_layers(self, config: Any, tp_size: int) -> None:
        """One engine `Attention` per decoder layer, on the HF module that calls attention
        for it, declared with what a probe forward saw HF pass (see `_Probe`)."""
        probe = _Probe()
        with torch.no_grad():
            self._hf_probe_logits = self.hf(**self._probe_inputs(), attn_metadata=probe).logits[0]
        windows = layer_sliding_windows(config)
        for layer_idx, (_, seen) in sorted(probe.calls.items()):
            if layer_idx >= len(windows) or seen[4] != windows[layer_idx]:
                probe.problems.append(
                    f"layer {layer_idx} attends with sliding_window {seen[4]}, its config says "
                    f"{windows[layer_idx] if layer_idx < len(windows) else 'no such layer'}")
        if sorted(probe.calls) != list(range(config.num_hidden_layers)):
            probe.problems.append(
                f"attention reached the engine for layers {sorted(probe.calls)} of "
                f"{config.num_hidden_layers} (does the class pass the forward's keyword "
                "arguments down to attention?)")
        probe.problems += check_local_heads(
            {i: seen[:2] for i, (_, seen) in probe.calls.items()}, config, tp_size)
        if probe.problems:
            raise ValueError(f"The transformers fallback cannot run {type(self.hf).__name__}:"
                             "\n  " + "\n  ".join(probe.problems)
                             + "\nRun an architecture with a native class instead "
                             "(--model-impl native lists them).")
        for layer_idx, (module, seen) in probe.calls.items():
            num_heads, num_kv_heads, head_dim, scale, window, softcap = seen
            module.paged_attn = Attention(num_heads, num_kv_heads, head_dim, scale,
                                          layer_idx=layer_idx, sliding_window=window,
                                          logits_soft_cap=softcap)

    def _probe_inputs(self) -> dict[str, Any]:
        device = next(self.hf.parameters()).device
        ids = torch.tensor([[0, 1, 2]], device=device)
        return dict(input_ids=ids, position_ids=torch.arange(3, device=device)[None],
                    use_cache=False)

    def _check_head(self) -> None:
        """The HF class's forward run whole (in the probe) and split as the runner runs it
        (base model, then `compute_logits`) must give the same logits; a class whose forward
        does more between the two than its head code is refused rather than run wrong."""
        with torch.no_grad():
            hidden = self.hf.base_model(**self._probe_inputs(), attn_metadata=_Probe())
            split = self.compute_logits(hidden.last_hidden_state[0])
        whole = self._hf_probe_logits.float()
        del self._hf_probe_logits
        if split.shape != whole.shape or not torch.allclose(split, whole, rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"The transformers fallback cannot run {type(self.hf).__name__}: its forward "
                "computes logits from the base model's output in a way the fallback does not "
                "reproduce. Run an architecture with a native class instead "
                "(--model-impl native lists them).")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any
                ) -> torch.Tensor:
        """[T] ids and positions (every request's tokens, flattened) -> [T, hidden] after
        the final norm. HF sees one batch row; our backend keeps the requests apart."""
        out = self.hf.base_model(input_ids=input_ids[None], position_ids=positions[None],
                                 use_cache=False, attn_metadata=attn_metadata)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32, by the HF class's own head code."""
        out = self._head(inputs_embeds=hidden_states[None], use_cache=False)
        return out.logits[0].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names map 1:1 onto the wrapped model (under `hf.`); a checkpoint saved from the
        base model alone (no `transformer.`/`model.` prefix) is accepted as HF accepts it.
        A tied head counts as loaded with the embedding it is."""
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        buffers = dict(self.hf.named_buffers())
        canonical = {id(p): f"hf.{n}" for n, p in self.hf.named_parameters()}
        prefix = self.hf.base_model_prefix + "."
        ignored = [re.compile(p) for p in
                   (getattr(self.hf, "_keys_to_ignore_on_load_unexpected", None) or ())]
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name
            if name not in params and name not in buffers and prefix + name in (
                    params.keys() | buffers.keys()):
                name = prefix + name
            target = params.get(name)
            if target is None:
                target = buffers.get(name)
            if target is None:
                if any(p.search(hf_name) for p in ignored):
                    continue
                raise ValueError(f"Checkpoint tensor {hf_name!r} has no parameter in "
                                 f"{type(self.hf).__name__}; the weights do not match the config.")
            load_full = getattr(target, "load_full", None)  # a TP slice: this rank's part
            if load_full is not None:
                try:
                    load_full(tensor)
                except ValueError as e:
                    raise ValueError(f"Checkpoint tensor {hf_name!r}: {e}") from None
            else:
                _copy_whole(target, hf_name, tensor, type(self.hf).__name__)
            if id(target) in canonical:
                loaded.add(canonical[id(target)])
        return loaded


def _copy_whole(target: torch.Tensor, hf_name: str, tensor: torch.Tensor, model: str) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"Checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                         f"{model} expects {tuple(target.shape)}; the weights do not match the config.")
    target.data.copy_(tensor)


def _architecture_name(hf_config: Any) -> str:
    try:
        return hf_causal_lm_class(hf_config).__name__
    except ValueError:
        archs = getattr(hf_config, "architectures", None)
        return archs[0] if archs else repr(getattr(hf_config, "model_type", None))
