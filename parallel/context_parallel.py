"""Context parallel (CP): every sequence split over the `cp` process group, for dense and
block-sparse attention (NSA, MoBA, sliding window).

Design
- Split: load-balanced zig-zag (Llama 3, Megatron CP). The sequence is cut into 2*cp chunks of
  C = S / (2 cp) tokens and cp rank r holds chunks r and 2cp-1-r, in that order. Under a causal
  mask chunk c costs c + 1 units of attention, so every rank does (r + 1) + (2cp - r) = 2cp + 1.
- Attention: K and V are all-gathered over cp in the forward and dK/dV reduce-scattered in the
  backward (`GatherSequence`, one collective of K and V stacked per layer). This is the Llama 3
  paper's choice for GQA models: K/V are n_kv_heads / n_heads of the query size, so the gather is
  small next to the attention it feeds, it needs no ring pipeline to overlap, and -- what decides
  it here -- the block-sparse kinds select among *all* KV blocks with the same code as one
  process (a ring would hand each rank K/V blocks in an order unrelated to the block lists).
  Queries stay local: each of the rank's two chunks runs the layer's own
  `attend(q_chunk, K[:end], V[:end], q_offset=chunk_start)` over the keys of its prefix (dense:
  SDPA with the causal diagonal aligned to the last key; sparse: block lists in global block
  numbers and key positions shifted by -q_offset for the kernels; see train/model/attention.py
  and train/model/sparse_attention/). This hooks in through the attention module's
  `core_wrapper` seam, so the model itself holds no parallelism (torchtitan's habit).
  dK/dV are reduce-scattered in the gradient's dtype (bf16 under autocast: cp partial sums are
  rounded once more than in one process).
- Positions: the model's `rope_tables` is rebound to the global positions of the shard.
- Loss: the whole-sequence mean, exactly as without CP: each rank all-reduces (sum of its token
  losses, its valid tokens) over cp. The loss a rank returns has the value sum / tokens of the
  whole sequence (so every engine logs and evaluates it unchanged) and the gradient of
  cp * (its own token losses) / (tokens of the whole sequence): averaging the gradients over
  dp x cp (groups.dp_cp_group, native.finalize_grads) then gives the gradient of the mean.
- Data: cp ranks share a dp rank, so the sampler gives them the same windows; each rank keeps
  its shard at the model's entry (the forward below). The loader, evaluation and every engine
  keep handling whole (B, S) token windows as in any other layout; the cost is that each cp rank
  copies the whole window's token ids to its device (8 bytes a token: 1 MB for 128K tokens).
- Checkpoints: parameters and optimizer state are replicated over cp and cp rank 0 writes
  (sharded_state._writes), so a checkpoint does not depend on cp.
- Composition (parallel/legality.py): dp, ZeRO-1 and tp (+ sequence parallel: each rank's shard
  is split again over tp) on the native engine. pp, DeepSpeed (ZeRO-2/3, offload), MoE and N:M
  fine-tuning are refused with a ConfigError.
"""

import types
import warnings
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

IGNORE_INDEX = -100


# ------------------------------------------------------------------------- the zig-zag split
def chunk_ids(cp: int, rank: int) -> Tuple[int, int]:
    """The two chunks (of 2*cp) cp rank `rank` holds, in the order it holds them."""
    return rank, 2 * cp - 1 - rank


def _chunk_len(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel: sequence length {seq_len} must divide into 2*cp = {2 * cp} chunks "
                         f"(train.seq_len)")
    return seq_len // (2 * cp)


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions (seq_len / cp,) of the tokens cp rank `rank` holds."""
    c = _chunk_len(seq_len, cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp, rank)])


def split_sequence(x: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """This rank's shard of x along `dim` (a copy: chunks r and 2cp-1-r concatenated)."""
    c = _chunk_len(x.shape[dim], cp)
    return torch.cat([x.narrow(dim, i * c, c) for i in chunk_ids(cp, rank)], dim)


def merge_sequence(shards: List[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of split_sequence: the whole sequence from every rank's shard (shards[r] of rank r)."""
    cp = len(shards)
    c = shards[0].shape[dim] // 2
    owner = {chunk: (r, half) for r in range(cp) for half, chunk in enumerate(chunk_ids(cp, r))}
    return torch.cat([shards[owner[i][0]].narrow(dim, owner[i][1] * c, c) for i in range(2 * cp)], dim)


# ------------------------------------------------------------------ collectives and autograd
# The comm timer (comm_timer.py) wraps these names; torch 2.13 deprecates them in favour of
# all_gather_single / reduce_scatter_single, which the timer does not wrap yet.
def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(out, inp, group=group)


def _gather_zigzag(x: torch.Tensor, dim: int, group, cp: int) -> torch.Tensor:
    x = x.contiguous()
    parts = x.new_empty((cp * x.shape[0], *x.shape[1:]))  # the ranks' shards one after another along dim 0
    _all_gather(parts, x, group)
    return merge_sequence(list(parts.view(cp, *x.shape).unbind(0)), dim)


def _reduce_scatter_zigzag(grad: torch.Tensor, dim: int, group, cp: int) -> torch.Tensor:
    shards = torch.cat([split_sequence(grad, dim, cp, r) for r in range(cp)])  # rank r's part: r-th along dim 0
    out = grad.new_empty((shards.shape[0] // cp, *shards.shape[1:]))
    _reduce_scatter(out, shards, group)
    return out


class GatherSequence(torch.autograd.Function):
    """Forward: every rank's zig-zag shard along `dim` all-gathered into the whole sequence, in
    global order. Backward: the gradient of the whole sequence summed over the ranks and each
    rank's shard kept (reduce-scatter), since every rank's queries read every rank's keys."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, cp: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.cp = dim, group, cp
        return _gather_zigzag(x, dim, group, cp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_zigzag(grad, ctx.dim, ctx.group, ctx.cp), None, None, None


# --------------------------------------------------------------------------- the CP context
class ContextParallel:
    """This rank's place in the cp group, and the pieces that patch a model from outside."""

    def __init__(self, group, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank
        self._positions: Dict[tuple, torch.Tensor] = {}

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return split_sequence(x, dim, self.cp, self.rank)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence from this rank's shard (differentiable: backward reduce-scatters)."""
        return GatherSequence.apply(x, dim, self.group, self.cp)

    def positions(self, local_len: int, device) -> torch.Tensor:
        key = (local_len, str(device))
        if key not in self._positions:
            self._positions[key] = zigzag_positions(local_len * self.cp, self.cp, self.rank, device)
        return self._positions[key]

    def attention(self, fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *per_query: torch.Tensor):
        """The attention modules' core_wrapper: `fn(q, k, v, *per_query, q_offset=...)` (an attend of
        train/model) for each of this rank's two chunks, over K/V gathered from the whole cp group.
        q and per_query: (B, H, S/cp, ...) this rank's shard; k, v (B, Hkv, S/cp, D)."""
        c = q.shape[2] // 2
        multiple = getattr(getattr(fn, "__self__", None), "q_offset_multiple", 1)
        if q.shape[2] % 2 or c % multiple:
            raise ValueError(f"context parallel: each of the 2*cp sequence chunks ({c} tokens) must be a multiple of "
                             f"the attention's block ({multiple}); make train.seq_len a multiple of "
                             f"2*cp*{multiple} = {2 * self.cp * multiple}")
        kv = self.gather(torch.stack((k, v)), dim=3)  # one collective for K and V: (2, B, Hkv, S, D)
        outs = []
        for half, chunk in enumerate(chunk_ids(self.cp, self.rank)):
            start, rows = chunk * c, slice(half * c, (half + 1) * c)
            end = start + c  # the chunk's queries see the keys of positions 0 .. end - 1
            outs.append(fn(q[:, :, rows], kv[0, :, :, :end], kv[1, :, :, :end], *(t[:, :, rows] for t in per_query),
                           q_offset=start))
        return torch.cat(outs, dim=2)

    def whole_sequence_loss(self, local_mean: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
        """Value: the mean token loss of the whole sequence. Gradient: cp * (this rank's token losses)
        / (tokens of the whole sequence), which averaged over cp is the gradient of that mean."""
        valid = (local_targets != IGNORE_INDEX).sum().to(torch.float32)
        local_sum = torch.where(valid > 0, local_mean.float() * valid, torch.zeros_like(valid))
        totals = torch.stack([local_sum.detach(), valid])
        dist.all_reduce(totals, group=self.group)
        whole_sum, whole_tokens = totals[0], totals[1].clamp(min=1)
        return _ValueOf.apply(local_sum * (self.cp / whole_tokens), whole_sum / whole_tokens)


class _ValueOf(torch.autograd.Function):
    """`value` in the forward, the gradient of `graded` in the backward (an exact value on every cp
    rank, unlike graded + (value - graded).detach())."""

    @staticmethod
    def forward(ctx, graded: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _cp_forward(self, tokens: torch.Tensor, targets=None, output_hidden_states: bool = False):
    """Llama.forward (or TP's) on this rank's shard of whole (B, S) windows; bound by
    apply_context_parallel. Logits come back whole (gathered over cp)."""
    if output_hidden_states:
        raise ValueError("output_hidden_states is not available under context parallel (parallel.cp > 1)")
    cp = self.context_parallel
    if targets is None:
        return cp.gather(cp.inner_forward(cp.split(tokens, 1)), dim=1)
    local_targets = cp.split(targets, 1)
    return cp.whole_sequence_loss(cp.inner_forward(cp.split(tokens, 1), local_targets), local_targets)


def _cp_rope_tables(self, s: int):
    """cos, sin of the global positions of this rank's s tokens."""
    cp = self.context_parallel
    if s * cp.cp > self.cfg.max_seq_len:
        raise ValueError(f"sequence length {s * cp.cp} > model.max_seq_len {self.cfg.max_seq_len}")
    pos = cp.positions(s, self.rope_cos.device)
    return self.rope_cos[pos], self.rope_sin[pos]


def apply_context_parallel(model: nn.Module, groups) -> nn.Module:
    """Patch a (TP-sharded or full) Llama in place to run its sequences split over groups.cp_group:
    the forward takes whole windows and keeps this rank's shard, RoPE takes the shard's global
    positions, and every attention module gathers K/V over cp (its `core_wrapper`)."""
    from sparsetron.train.model.attention import SelfAttention

    if groups.cp == 1:
        return model
    ctx = ContextParallel(groups.cp_group, groups.cp, groups.cp_rank)
    attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not attention:
        raise ValueError("context parallel: the model has no SelfAttention module to split over the sequence")
    # a compiled block (train.compile) runs this core eagerly: collectives inside an autograd.Function
    # are a graph break anyway, and the attention kernels are not what compile fuses
    core = torch.compiler.disable(ctx.attention)
    for m in attention:
        m.core_wrapper = core
    ctx.inner_forward = model.forward  # Llama.forward, or tensor parallel's vocab-parallel one
    model.context_parallel = ctx
    model.forward = types.MethodType(_cp_forward, model)
    model.rope_tables = types.MethodType(_cp_rope_tables, model)
    return model


__all__ = ["ContextParallel", "GatherSequence", "apply_context_parallel", "chunk_ids", "merge_sequence",
           "split_sequence", "zigzag_positions"]
