"""Expert parallelism: each rank of the tensor-parallel group holds whole experts (a
contiguous range of them), and token-slots travel to the rank of their expert and back.

Rule: the MoE block's input is the same on every rank (the residual stream is whole), so
each rank takes its own slice of the tokens, routes it, sends every (token, expert) slot to
the rank holding that expert (`all_to_all`), runs its experts on what it received, sends the
outputs back (`all_to_all`), and weights and sums them into its slice. What leaves is a
partial sum (the rank's own token rows, zeros elsewhere): the next norm sums the ranks, as it
does after every row-parallel layer, so no all-gather is needed.

Why fixed-size buffers: every rank sends each peer room for all of its slots (tokens x
top_k), padded with id -1, so the shapes never depend on where tokens are routed. The
exchange is then capturable in a graph and needs no count exchange first; the price is
padding traffic, at most ep_size times the useful bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from platforms.interface import Communicator

# (x [N, H], local expert ids [N], -1 for padding) -> [N, H], rows of -1 ids zero.
ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertParallel:
    """Dispatch and combine over `comm`, whose rank r holds experts
    r * num_local_experts .. (r + 1) * num_local_experts - 1."""

    def __init__(self, comm: Communicator, num_experts: int) -> None:
        if num_experts % comm.world_size:
            raise ValueError(f"{num_experts} experts do not split over {comm.world_size} "
                             "expert-parallel ranks.")
        self.comm = comm
        self.ep_size, self.ep_rank = comm.world_size, comm.rank
        self.num_local_experts = num_experts // comm.world_size
        self.expert_start = self.ep_rank * self.num_local_experts

    def __call__(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, experts: ExpertsFn) -> torch.Tensor:
        """hidden [T, H] (the same on every rank), topk_weights [T, k] float32, topk_ids
        [T, k] global expert ids -> this rank's partial output [T, H]."""
        num_tokens, top_k = topk_ids.shape
        ep, local = self.ep_size, self.num_local_experts
        chunk = -(-num_tokens // ep)  # tokens per rank (the last may have fewer)
        lo = min(self.ep_rank * chunk, num_tokens)
        hi = min(lo + chunk, num_tokens)
        room = chunk * top_k  # slots this rank may send one peer: all of its own
        slot_ids = topk_ids[lo:hi].reshape(-1).long()  # [S], S = (hi - lo) * top_k
        dest = torch.div(slot_ids, local, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        dest_sorted = dest[order]
        counts = torch.bincount(dest, minlength=ep)
        starts = torch.cumsum(counts, 0) - counts
        place = torch.arange(len(order), device=hidden.device) - starts[dest_sorted]
        width = hidden.shape[1]
        send_x = hidden.new_zeros(ep, room, width)
        send_ids = torch.full((ep, room), -1, dtype=torch.int64, device=hidden.device)
        token_of_slot = lo + torch.div(order, top_k, rounding_mode="floor")
        send_x[dest_sorted, place] = hidden[token_of_slot]
        send_ids[dest_sorted, place] = slot_ids[order] - dest_sorted * local
        recv_x = self.comm.all_to_all(send_x.view(ep * room, width))
        recv_ids = self.comm.all_to_all(send_ids.view(ep * room))
        out = experts(recv_x, recv_ids)  # [ep * room, H]
        back = self.comm.all_to_all(out).view(ep, room, width)
        weights = topk_weights[lo:hi].reshape(-1)[order].to(torch.float32)
        contrib = back[dest_sorted, place].float() * weights[:, None]
        partial = torch.zeros(num_tokens, width, dtype=torch.float32, device=hidden.device)
        partial.index_add_(0, token_of_slot, contrib)
        return partial.to(hidden.dtype)
