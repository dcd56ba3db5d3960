"""SonicMoE token rounding: move a few (token, expert) assignments so that every expert's token
count is a multiple of the kernel tile ``tile_m`` (no padded tile rows). Tensor ops only."""

import torch


def round_expert_counts(counts: torch.Tensor, tile_m: int, num_tokens: int) -> torch.Tensor:
    """Round every expert's token count to a multiple of ``tile_m``.

    Each count goes to floor or ceil of its tile multiple. Which experts go up is chosen like the
    largest-remainder method: the ``round(sum(rem) / tile_m)`` experts with the largest remainders
    round up (those nearest to the next multiple), the rest round down. That is "whichever is
    nearer" for each expert up to ties, and keeps the total within tile_m / 2 of the top-k total,
    so the mean experts per token stays within tile_m / (2 T) of k. An expert that cannot grow
    (fewer than tile_m - rem unselected tokens left) rounds down."""
    rem = counts % tile_m
    base = counts - rem
    can_grow = (rem > 0) & (base + tile_m <= num_tokens)
    n_up = torch.round(rem.sum().double() / tile_m).long()
    priority = torch.where(can_grow, rem, torch.full_like(rem, -1))
    rank = torch.empty_like(counts)
    rank[torch.argsort(priority, descending=True, stable=True)] = torch.arange(counts.numel(), device=counts.device)
    up = can_grow & (rank < n_up)
    return base + tile_m * up.long()


def priority_key(score: torch.Tensor) -> torch.Tensor:
    """(T, E) scores -> (E, T) int64 keys ordering every expert's tokens by (score descending, token
    ascending), all distinct: the score's float bits made order-preserving in the high 32 bits and
    the reversed token index in the low 32. One total order, so "the best" and "the worst" tokens
    of an expert never depend on how a sort or topk breaks ties."""
    t = score.shape[0]
    # (+ 0.0 turns -0.0 into +0.0, so equal values always tie)
    bits = (score.detach().float().t() + 0.0).contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude is smaller
    rev_token = torch.arange(t - 1, -1, -1, device=score.device, dtype=torch.int64)
    return bits * (1 << 32) + rev_token


def token_rounding_mask(select_score: torch.Tensor, topk_mask: torch.Tensor, tile_m: int) -> torch.Tensor:
    """New (T, E) assignment mask whose per-expert counts are tile multiples.

    Per expert, the target count is the nearer tile multiple (round_expert_counts), so at most
    tile_m - 1 tokens move: the lowest-priority of its top-k tokens are dropped when the target is
    below the count, the highest-priority tokens that did not select it are added when above.
    Priority is the router score, ties broken by token index (the lower index ranks higher; see
    priority_key), so the result is deterministic. Two top-(tile_m) selections over the (E, T)
    keys find both candidate lists -- a full sort of every expert's T scores costs more than the
    padding rounding saves. A (token, expert) pair appears at most once, so no token is routed
    twice to one expert. (The fused, sync-free version: kernels/moe/fused_routing.)"""
    t = select_score.shape[0]
    counts = topk_mask.sum(0)
    delta = round_expert_counts(counts, tile_m, t) - counts  # (E,), |delta| < tile_m
    k = min(tile_m, t)
    key, sel = priority_key(select_score), topk_mask.t()  # (E, T)
    lowest = torch.iinfo(torch.int64).min
    # ~key reverses the order without overflow: the largest ~key is the lowest-priority token
    lowest_selected = torch.topk(torch.where(sel, ~key, lowest), k, dim=1).indices
    best_unselected = torch.topk(torch.where(sel, lowest, key), k, dim=1).indices
    j = torch.arange(k, device=key.device)[None, :]
    mask = sel.clone()
    # the first -delta of the lowest-selected list go, the first +delta of the best-unselected come
    mask.scatter_(1, lowest_selected, mask.gather(1, lowest_selected) & (j >= (-delta)[:, None]))
    mask.scatter_(1, best_unselected, mask.gather(1, best_unselected) | (j < delta[:, None]))
    return mask.t()
