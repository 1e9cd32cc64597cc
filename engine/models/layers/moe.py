"""Mixture-of-experts layers: the routed experts (`FusedMoE`), the block around them (router,
optional shared expert: `SparseMoeBlock`), and how HF expert weights find their slots.

Rule: every expert's weights live stacked in two tensors, w13 [E_local, 2 * I_local, H]
(gate rows then up rows) and w2 [E_local, H, I_local], and one named op
(`kernel("fused_moe")`, looked up at construction) runs routing and experts together, so a
platform swaps the whole block at once. The router is replicated: every rank routes every
token the same way.

Tensor parallelism splits each expert's intermediate dim over the TP ranks (w13's gate and
up halves column-wise, w2 row-wise), like `LlamaMLP`: the output is this rank's partial sum,
left, like a row-parallel layer's with `reduce_output=False`, to the next norm to add over
the ranks (`reduce_output=True` sums it here, for Gemma-style decoders).

Expert parallelism (`--enable-expert-parallel`: `ParallelContext.expert_parallel`) splits
the experts instead: this rank holds experts [expert_start, expert_start +
num_local_experts) whole (it loads only those), and the forward runs two steps:
`moe_select_experts` over all experts, then `ExpertParallel` (engine.models.layers.
expert_parallel) sends each token-slot of this rank's token slice to its expert's rank
through all_to_all, runs `fused_experts` there and brings the outputs back. The output is
again a partial sum (this rank's token rows), reduced by the same norm.

Expert load (expert parallelism's balancing signal): an expert-parallel layer adds the
token-slots routed to each global expert to its `expert_load` buffer (int64 [E], on the
device, in place: no host sync, graph-capturable); the model runner sums and zeroes the
buffers when asked (`ModelRunner.take_expert_load`). Routing is replicated, so every rank
counts the same. Without expert parallelism nothing is counted: the one fused op hides the
routing (a platform's `fused_moe` gives no ids). Under a capturing graph runner the padding
rows of a batch are routed and counted too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import nn

from engine.distributed import parallel_context
from engine.models.layers.activation import gated_activation
from engine.models.layers.expert_parallel import ExpertParallel
from engine.models.layers.linear import Linear, MergedColumnParallelLinear, RowParallelLinear
from platforms.kernels import MoERouting, kernel


class FusedMoE(nn.Module):
    """The routed experts of one layer: (hidden [T, H], router_logits [T, E]) -> [T, H].
    Expert-parallel, it counts token-slots per expert in `expert_load` (int64 [E]); else
    `expert_load` is None: the fused op routes inside, its ids are never seen."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 routing: MoERouting, activation: str = "silu", reduce_output: bool = False,
                 expert_parallel: Optional[bool] = None) -> None:
        super().__init__()
        ctx = parallel_context()
        if expert_parallel is None:  # the engine's --enable-expert-parallel
            expert_parallel = ctx.expert_parallel
        self.tp_rank, self.tp_size, self.comm = ctx.tp_rank, ctx.tp_size, ctx.tp_comm
        if top_k != routing.top_k:
            raise ValueError(f"FusedMoE top_k {top_k} differs from its routing's "
                             f"{routing.top_k}.")
        self.num_experts, self.routing, self.activation = num_experts, routing, activation
        self.reduce_output = reduce_output
        if expert_parallel:  # whole experts, a contiguous range of them per rank
            if num_experts % self.tp_size:
                raise ValueError(f"{num_experts} experts do not split over {self.tp_size} "
                                 "ranks; change --tensor-parallel-size.")
            self.num_local_experts = num_experts // self.tp_size
            self.expert_start = self.tp_rank * self.num_local_experts
            self.intermediate_local, self.intermediate_start = intermediate_size, 0
        else:  # every expert, each split over the ranks along its intermediate dim
            if intermediate_size % self.tp_size:
                raise ValueError(f"The experts' intermediate size {intermediate_size} does not "
                                 f"split over {self.tp_size} ranks; change "
                                 "--tensor-parallel-size.")
            self.num_local_experts, self.expert_start = num_experts, 0
            self.intermediate_local = intermediate_size // self.tp_size
            self.intermediate_start = self.tp_rank * self.intermediate_local
        self.intermediate_size = intermediate_size
        e, i = self.num_local_experts, self.intermediate_local
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, hidden_size, i), requires_grad=False)
        # The full (every expert, unsplit) HF-fused shapes, for dummy weights and fused files.
        self.w13.full_shape = (num_experts, 2 * intermediate_size, hidden_size)  # type: ignore[attr-defined]
        self.w13.load_full = self._load_full_w13  # type: ignore[attr-defined]
        self.w2.full_shape = (num_experts, hidden_size, intermediate_size)  # type: ignore[attr-defined]
        self.w2.load_full = self._load_full_w2  # type: ignore[attr-defined]
        # Token-slots per global expert since the last take (expert-parallel only). A
        # non-persistent buffer: no parameter, not in state_dict, never loaded or filled.
        self.expert_load: Optional[torch.Tensor]
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64)
                             if num_experts > self.num_local_experts else None,
                             persistent=False)
        self._fused_moe = kernel("fused_moe")
        self._select_experts = kernel("moe_select_experts")
        self._fused_experts = kernel("fused_experts")
        # Without a communicator (one process building several ranks' layers, in tests)
        # each rank runs its experts over every token: the same partial sums, no exchange.
        self._exchange: Optional[ExpertParallel] = None
        if self.is_expert_parallel and self.comm is not None:
            self._exchange = ExpertParallel(self.comm, num_experts)

    @property
    def is_expert_parallel(self) -> bool:
        return self.num_local_experts < self.num_experts

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.is_expert_parallel:
            out = self._forward_expert_parallel(hidden, router_logits)
        else:
            out = self._fused_moe(hidden, router_logits, self.w13, self.w2, self.routing,
                                  None, self.activation)
        if self.reduce_output and self.comm is not None and self.tp_size > 1:
            out = self.comm.all_reduce(out)
        return out

    def _forward_expert_parallel(self, hidden: torch.Tensor, router_logits: torch.Tensor
                                 ) -> torch.Tensor:
        """Route over all experts, then exchange token-slots with the ranks holding their
        experts (a partial sum of this rank's token rows)."""
        weights, ids = self._select_experts(router_logits, self.routing, None)
        assert self.expert_load is not None
        # ids [T, k] cover every token (routing is replicated), so each rank counts all.
        self.expert_load.index_add_(0, ids.reshape(-1).long(),
                                    torch.ones_like(ids, dtype=torch.int64).reshape(-1))
        if self._exchange is None:
            local = ids - self.expert_start
            local = torch.where((local >= 0) & (local < self.num_local_experts), local, -1)
            return self._fused_experts(hidden, self.w13, self.w2, weights, local,
                                       self.activation)
        return self._exchange(hidden, weights, ids, self._run_local_experts)

    def _run_local_experts(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Each received row through its one local expert (-1: padding, zero out)."""
        ones = torch.ones(len(x), 1, dtype=torch.float32, device=x.device)
        return self._fused_experts(x, self.w13, self.w2, ones, local_ids[:, None],
                                   self.activation)

    # ---- weights ----------------------------------------------------------------------

    def local_expert(self, expert_id: int) -> Optional[int]:
        """This rank's slot for global expert `expert_id`, None if another rank holds it."""
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"Expert {expert_id} is outside the layer's {self.num_experts} "
                             "experts; the checkpoint does not match the config.")
        local = expert_id - self.expert_start
        return local if 0 <= local < self.num_local_experts else None

    def load_expert(self, param: nn.Parameter, tensor: torch.Tensor, expert_id: int,
                    shard: Optional[int]) -> None:
        """Copy one full HF expert projection into its slot: w13 with `shard` 0 (gate,
        [I, H]) or 1 (up, [I, H]); w2 with `shard` None (down, [H, I]). This rank keeps its
        slice of the intermediate dim; an expert another rank holds is skipped."""
        local = self.local_expert(expert_id)
        i, start, full = self.intermediate_local, self.intermediate_start, self.intermediate_size
        if param is self.w13:
            if shard not in (0, 1) or tuple(tensor.shape) != (full, param.shape[2]):
                raise ValueError(f"Expert {expert_id} gate/up projection (shard {shard}) has "
                                 f"shape {tuple(tensor.shape)}, expected {(full, param.shape[2])}"
                                 "; the checkpoint does not match the config.")
            if local is not None:
                param.data[local, shard * i:(shard + 1) * i].copy_(tensor.narrow(0, start, i))
        elif param is self.w2:
            if shard is not None or tuple(tensor.shape) != (param.shape[1], full):
                raise ValueError(f"Expert {expert_id} down projection has shape "
                                 f"{tuple(tensor.shape)}, expected {(param.shape[1], full)}; "
                                 "the checkpoint does not match the config.")
            if local is not None:
                param.data[local].copy_(tensor.narrow(1, start, i))
        else:
            raise ValueError("load_expert takes this layer's w13 or w2.")

    def _check_full(self, tensor: torch.Tensor, param: nn.Parameter, what: str) -> None:
        if tuple(tensor.shape) != tuple(param.full_shape):  # type: ignore[attr-defined]
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.full_shape)}; the checkpoint does not match the "  # type: ignore[attr-defined]
                             "config.")

    def _load_full_w13(self, tensor: torch.Tensor) -> None:
        """HF's fused gate_up_proj [E, 2I, H] (gate rows, then up rows, per expert)."""
        self._check_full(tensor, self.w13, "The experts' gate_up_proj")
        for e in range(self.num_experts):
            gate, up = tensor[e].chunk(2, dim=0)
            self.load_expert(self.w13, gate, e, 0)
            self.load_expert(self.w13, up, e, 1)

    def _load_full_w2(self, tensor: torch.Tensor) -> None:
        """HF's fused down_proj [E, H, I]."""
        self._check_full(tensor, self.w2, "The experts' down_proj")
        for e in range(self.num_experts):
            self.load_expert(self.w2, tensor[e], e, None)


class SharedExpertMLP(nn.Module):
    """A dense gated MLP beside the routed experts (Qwen2-MoE), split like `LlamaMLP`."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 reduce_output: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size,
                                           reduce_output=reduce_output)
        self.act = gated_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """A decoder layer's MLP as a mixture of experts: router logits from a replicated `gate`,
    the routed experts, and optionally a shared expert scaled by sigmoid(shared_expert_gate(
    x)) added to them (outside the `fused_moe` op). [T, H] -> [T, H], a partial sum over the
    TP ranks unless `reduce_output`."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int,
                 routing: MoERouting, activation: str = "silu",
                 shared_intermediate_size: Optional[int] = None, reduce_output: bool = False,
                 expert_parallel: Optional[bool] = None) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, routing.top_k, hidden_size, intermediate_size,
                                routing, activation, reduce_output=reduce_output,
                                expert_parallel=expert_parallel)
        self.shared_expert: Optional[SharedExpertMLP] = None
        self.shared_expert_gate: Optional[Linear] = None
        if shared_intermediate_size:
            self.shared_expert = SharedExpertMLP(hidden_size, shared_intermediate_size,
                                                 activation, reduce_output)
            self.shared_expert_gate = Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            assert self.shared_expert_gate is not None
            # A per-token scalar times a partial sum is still a partial sum.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# ---- HF checkpoint names ------------------------------------------------------------------

# `...experts.<e>.<proj>.weight` (per expert) and `...experts.<fused>` (transformers v5).
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_PER_EXPERT_PROJ = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None,
                    "down_proj": None}
_FUSED = {"gate_up_proj": "w13", "down_proj": "w2"}


class ExpertWeights:
    """Takes the expert tensors out of a stream of (HF name, tensor) pairs into a model's
    `FusedMoE` layers and passes every other pair on, renamed where the HF block has another
    name (Mixtral's `block_sparse_moe` is our `mlp`). `loaded` names the expert parameters
    whose every expert (and gate and up) has arrived, once the stream is exhausted."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded: set[str] = set()
        self._seen: dict[str, set[tuple[int, Optional[int]]]] = {}

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in weights:
            name = hf_name.replace(".block_sparse_moe.", ".mlp.")
            if not self._take(name, tensor, hf_name):
                yield name, tensor

    def _take(self, name: str, tensor: torch.Tensor, hf_name: str) -> bool:
        match = _PER_EXPERT.match(name)
        if match is not None and match.group(3) in _PER_EXPERT_PROJ:
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            shard = _PER_EXPERT_PROJ[proj]
            param_name = f"{prefix}.{'w2' if shard is None else 'w13'}"
            layer = self._layer(prefix, hf_name)
            if layer is None:
                return True
            layer.load_expert(getattr(layer, param_name.rsplit(".", 1)[1]), tensor, expert,
                              shard)
            seen = self._seen.setdefault(param_name, set())
            seen.add((expert, shard))
            if len(seen) == layer.num_experts * (1 if shard is None else 2):
                self.loaded.add(param_name)
            return True
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and leaf in _FUSED:
            layer = self._layer(prefix, hf_name)
            if layer is not None:
                param = getattr(layer, _FUSED[leaf])
                try:
                    param.load_full(tensor)
                except ValueError as e:
                    raise ValueError(f"Checkpoint tensor {hf_name!r}: {e}") from None
                self.loaded.add(f"{prefix}.{_FUSED[leaf]}")
            return True
        return False

    def _layer(self, prefix: str, hf_name: str) -> Optional[FusedMoE]:
        """The FusedMoE at `prefix`; None when another pipeline stage holds the layer."""
        try:
            layer = self.model.get_submodule(prefix)
        except AttributeError:
            layer = None
        if isinstance(layer, FusedMoE):
            return layer
        if isinstance(layer, nn.Identity) or _is_placeholder(self.model, prefix):
            return None
        raise ValueError(f"Checkpoint tensor {hf_name!r} names experts, but "
                         f"{type(self.model).__name__} has no MoE layer at {prefix!r}; the "
                         "weights do not match the config's architecture.")


def _is_placeholder(model: nn.Module, prefix: str) -> bool:
    """Whether `prefix` lies in a decoder layer another pipeline stage holds."""
    parts = prefix.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        try:
            return isinstance(model.get_submodule(".".join(parts[:3])), nn.Identity)
        except AttributeError:
            return False
    return False
