"""Expert parallelism: experts sharded over an ``ep_group``, tokens exchanged by all-to-all.

Rank r owns global experts [r * E_local, (r + 1) * E_local). Dispatch: each rank sends the rows of
its expert-sorted assignments to their owners (one variable-split all-to-all; the split sizes are
the only host sync). The owner runs its local experts on the received rows as a k=1 routing (every
received row is its own "token", weight 1), then the results travel back through the reverse
all-to-all and the routing weights are applied where the tokens live. Both all-to-alls are
differentiable (backward is the reverse exchange), so expert weights get gradients from every
rank's tokens and x / the router get theirs locally. Works over gloo (CPU) and NCCL.
"""

from typing import Callable, List

import torch
import torch.distributed as dist

from sparsetron.kernels.moe.routing import Routing, routing_from_topk


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: List[int], recv_splits: List[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def ep_moe_experts(
    x: torch.Tensor,
    w_gate_up_local: torch.Tensor,
    w_down_local: torch.Tensor,
    routing: Routing,
    group,
    local_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Routing], torch.Tensor],
) -> torch.Tensor:
    """x: (T, D) local tokens; routing over all E experts; weights hold this rank's E_local experts.
    ``local_experts(x, w1, w2, routing)`` is the single-device expert MLP (Triton or reference)."""
    # a token-rounded plan is padded to a static size; the all-to-all needs the real rows (it syncs
    # for its splits anyway)
    routing = routing.compact()
    world = dist.get_world_size(group)
    e_local = w_gate_up_local.shape[0]
    if routing.num_experts != e_local * world:
        raise ValueError(f"routing has {routing.num_experts} experts; ep world {world} x local {e_local} differ")
    counts = routing.counts.to(torch.int64)
    # recv_counts[s * E_local + j]: rows rank s sends to my local expert j.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(world, e_local).sum(1).tolist()
    recv_splits = recv_counts.view(world, e_local).sum(1).tolist()

    # The rows on the wire are the only gathered copy of x; it exists because it has to be sent.
    sent = x.index_select(0, routing.sorted_token.long())
    received = all_to_all(sent, send_splits, recv_splits, group)
    local_expert = torch.repeat_interleave(
        torch.arange(e_local, device=x.device).repeat(world), recv_counts.to(x.device), output_size=received.shape[0]
    )
    ones = torch.ones(received.shape[0], 1, device=x.device)
    local_routing = routing_from_topk(local_expert[:, None], ones, e_local)
    y_local = local_experts(received, w_gate_up_local, w_down_local, local_routing)
    y = all_to_all(y_local, recv_splits, send_splits, group)
    weighted = y.float() * routing.sorted_weight[:, None]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add(0, routing.sorted_token.long(), weighted).to(x.dtype)
