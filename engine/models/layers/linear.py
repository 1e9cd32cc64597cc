"""Linear and embedding layers, split over tensor-parallel ranks, whose weights arrive by HF
name as full tensors.

Rule: parameters are allocated uninitialised (`torch.empty`) at this rank's size: a loader
always fills them. Every parameter has a `load_full(tensor)` that takes the FULL HF tensor
and copies this rank's slice (`narrow`), so no rank ever keeps a full weight. A merged layer
(q/k/v or gate/up) is one matmul over this rank's slice of EACH projection, stacked; its
`load_shard(param, tensor, shard)` takes one full HF projection. The rank and size come
from the current `ParallelContext` at construction; with one rank every layer is a plain
linear and no collective runs.

Column-parallel: output rows split, no communication. Row-parallel: input columns split,
partial sums added with the communicator's all_reduce (bias once, after it), or, with
`reduce_output=False`, left for the layer after to sum (an `RMSNorm(partial_input=True)`
fuses that sum with its residual add; the bias is then added on rank 0 only). Vocabulary-
parallel: rows of the table split (padded to equal parts); lookups are masked and summed
over ranks; logits are gathered to every rank (so every rank samples the same tokens).

LoRA: every linear here can carry adapters, at no cost while LoRA is off: `lora` is None
unless `engine.lora.LoRAManager` bound its device slots, and then, after the base matmul,
the step's tokens with an adapter get theirs added (`LayerSlots.add_to`). Each layer says how
an adapter shards with it (`lora_full_shapes`, `lora_shard`): column-parallel keeps lora_A
whole and this rank's output rows of lora_B; row-parallel this rank's input columns of
lora_A and lora_B whole, so by linearity the delta is a partial sum like the base output
and rides the same reduction (no extra collective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import parallel_context
from engine.distributed.sharding import split_heads
from platforms.util import cdiv

if TYPE_CHECKING:
    from engine.lora.slots import LayerSlots


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _set_loader(param: nn.Parameter, full_shape: tuple[int, ...],
                load_full: Callable[[torch.Tensor], None]) -> None:
    """Attach the full (unsplit) shape and the loader that copies this rank's slice."""
    param.full_shape = full_shape  # type: ignore[attr-defined]
    param.load_full = load_full  # type: ignore[attr-defined]


def _copy(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(
            f"{what} has shape {tuple(source.shape)} (this rank's slice), expected "
            f"{tuple(target.shape)}; the checkpoint does not match the config."
        )
    target.copy_(source)


def _check_full(tensor: torch.Tensor, full_shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != tuple(full_shape):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the model expects "
                         f"{tuple(full_shape)}; the checkpoint does not match the config.")


class Linear(nn.Module):
    """y = x @ W.T (+ b), W: [out_features, in_features], replicated on every rank."""

    lora: Optional[LayerSlots] = None  # bound by the LoRA manager; None: no adapters

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features)
        self.bias: Optional[nn.Parameter] = _param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora.add_to(x, y)

    # ---- LoRA: how an adapter of this layer shards (one slice; merged layers have more) ----
    @property
    def lora_slice_sizes(self) -> tuple[int, ...]:
        """This rank's output size of each projection an adapter may target."""
        return (self.out_features,)

    def lora_full_shapes(self, index: int) -> tuple[int, int]:
        """(in, out) features of projection `index` in full (the adapter's shapes)."""
        return self.in_features, self.out_features

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, index: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full lora_A [r, in] and lora_B [out, r] of projection `index` -> this rank's."""
        return a, b


class ColumnParallelLinear(Linear):
    """Output rows split over ranks: y_local = x @ W[rows of this rank].T; no collective."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        ctx = parallel_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        if out_features % self.tp_size:
            raise ValueError(f"{out_features} output features do not split over "
                             f"{self.tp_size} ranks; change --tensor-parallel-size.")
        super().__init__(in_features, out_features // self.tp_size, bias)
        self.full_out_features = out_features
        for param in self._params():
            _set_loader(param, (out_features, *param.shape[1:]),
                        lambda t, p=param: self._load_rows(p, t))

    def _params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def _load_rows(self, param: nn.Parameter, tensor: torch.Tensor) -> None:
        _check_full(tensor, param.full_shape, "A column-parallel weight")  # type: ignore[attr-defined]
        size = param.shape[0]
        _copy(param.data, tensor.narrow(0, self.tp_rank * size, size), "A column slice")

    def lora_full_shapes(self, index: int) -> tuple[int, int]:
        return self.in_features, self.full_out_features

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, index: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return a, b.narrow(0, self.tp_rank * self.out_features, self.out_features)


class MergedColumnParallelLinear(Linear):
    """Several projections of one input, each split over ranks; this rank stacks its slice of
    each: rows [p0 slice | p1 slice | ...]."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        ctx = parallel_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        local = self._local_sizes(output_sizes)
        super().__init__(in_features, sum(local), bias)
        self.full_output_sizes = list(output_sizes)
        self.output_sizes = local
        self.offsets = [sum(local[:i]) for i in range(len(local))]
        for param in (self.weight, self.bias):
            if param is not None:
                _set_loader(param, (sum(output_sizes), *param.shape[1:]),
                            lambda t, p=param: self._load_merged(p, t))

    def _local_sizes(self, output_sizes: list[int]) -> list[int]:
        if any(size % self.tp_size for size in output_sizes):
            raise ValueError(f"Projections of sizes {output_sizes} do not split over "
                             f"{self.tp_size} ranks; change --tensor-parallel-size.")
        return [size // self.tp_size for size in output_sizes]

    def _source_rows(self, shard: int) -> int:
        """First row, in the full HF projection `shard`, of this rank's slice."""
        return self.tp_rank * self.output_sizes[shard]

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        """Copy this rank's slice of full HF projection `shard` (weight or bias) into its rows."""
        full = self.full_output_sizes[shard]
        if tensor.shape[0] != full:
            raise ValueError(
                f"Shard {shard} of a merged projection has shape {tuple(tensor.shape)}, "
                f"expected {full} rows; the checkpoint does not match the config."
            )
        size = self.output_sizes[shard]
        target = param.data.narrow(0, self.offsets[shard], size)
        _copy(target, tensor.narrow(0, self._source_rows(shard), size), f"Shard {shard}")

    def _load_merged(self, param: nn.Parameter, tensor: torch.Tensor) -> None:
        """The full stacked tensor (dummy weights): split by projection, then by rank."""
        _check_full(tensor, param.full_shape, "A merged weight")  # type: ignore[attr-defined]
        for shard, part in enumerate(tensor.split(self.full_output_sizes, dim=0)):
            self.load_shard(param, part, shard)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., sum(output_sizes)] -> one view per projection (this rank's slices)."""
        return y.split(self.output_sizes, dim=-1)

    @property
    def lora_slice_sizes(self) -> tuple[int, ...]:
        return tuple(self.output_sizes)

    def lora_full_shapes(self, index: int) -> tuple[int, int]:
        return self.in_features, self.full_output_sizes[index]

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, index: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_B's rows as the base weight's (QKV: this rank's query heads, its KV head)."""
        return a, b.narrow(0, self._source_rows(index), self.output_sizes[index])


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k, v stacked; query heads split over ranks, KV heads split or, when there are fewer
    KV heads than ranks, the one KV head this rank's query heads read is replicated here."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        ctx = parallel_context()
        self.heads = split_heads(num_heads, num_kv_heads, ctx.tp_rank, ctx.tp_size)
        self.head_dim = head_dim
        kv = num_kv_heads * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv, kv], bias)

    def _local_sizes(self, output_sizes: list[int]) -> list[int]:
        q = self.heads.num_heads * self.head_dim
        kv = self.heads.num_kv_heads * self.head_dim
        return [q, kv, kv]

    def _source_rows(self, shard: int) -> int:
        if shard == 0:
            return self.tp_rank * self.output_sizes[0]
        return self.heads.kv_head_start * self.head_dim


class RowParallelLinear(Linear):
    """Input columns split over ranks (the input arrives split, from a column-parallel layer);
    partial products summed over ranks with all_reduce, then the (replicated) bias added.
    With `reduce_output=False` the output is this rank's partial sum (bias on rank 0 only):
    the next layer sums it, fused with what it does (see `RMSNorm`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 reduce_output: bool = True) -> None:
        ctx = parallel_context()
        self.tp_rank, self.tp_size, self.comm = ctx.tp_rank, ctx.tp_size, ctx.tp_comm
        self.reduce_output = reduce_output
        if in_features % self.tp_size:
            raise ValueError(f"{in_features} input features do not split over "
                             f"{self.tp_size} ranks; change --tensor-parallel-size.")
        super().__init__(in_features // self.tp_size, out_features, bias)
        _set_loader(self.weight, (out_features, in_features), self._load_columns)
        if self.bias is not None:
            _set_loader(self.bias, (out_features,),
                        lambda t: _copy(self.bias.data, t, "A row-parallel bias"))

    def _load_columns(self, tensor: torch.Tensor) -> None:
        _check_full(tensor, self.weight.full_shape, "A row-parallel weight")  # type: ignore[attr-defined]
        size = self.weight.shape[1]
        _copy(self.weight.data, tensor.narrow(1, self.tp_rank * size, size), "A row slice")

    def lora_full_shapes(self, index: int) -> tuple[int, int]:
        return self.in_features * self.tp_size, self.out_features

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, index: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's input columns of lora_A: its delta is a partial sum, as its output."""
        size = self.in_features
        return a.narrow(1, self.tp_rank * size, size), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.lora is not None:  # before the reduction: a partial sum like y
            y = self.lora.add_to(x, y)
        if self.comm is None or self.tp_size == 1:
            return y if self.bias is None else y + self.bias
        if not self.reduce_output:  # a partial sum; the bias counted once, on rank 0
            return y if self.bias is None or self.tp_rank else y + self.bias
        y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token table [vocab, hidden], rows split over ranks in equal parts (the last padded
    with zero rows). Also the LM head (tied or not): `logits` gathers every rank's columns."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        ctx = parallel_context()
        self.tp_rank, self.tp_size, self.comm = ctx.tp_rank, ctx.tp_size, ctx.tp_comm
        self.num_embeddings = num_embeddings
        self.rows_per_rank = cdiv(num_embeddings, self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = _param(self.rows_per_rank, embedding_dim)
        _set_loader(self.weight, (num_embeddings, embedding_dim), self._load_rows)

    def _load_rows(self, tensor: torch.Tensor) -> None:
        _check_full(tensor, self.weight.full_shape, "An embedding table")  # type: ignore[attr-defined]
        count = max(self.vocab_end - self.vocab_start, 0)
        self.weight.data[count:].zero_()  # padding rows: zero logits, sliced off anyway
        _copy(self.weight.data[:count], tensor.narrow(0, self.vocab_start, count),
              "An embedding slice")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.comm.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] on every rank (this rank's columns gathered)."""
        local = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return local
        return self.comm.all_gather(local, dim=-1)[..., : self.num_embeddings]
