"""Tensor parallel (+ sequence parallel) for the Llama model, applied from outside the model code.

`parallelize(model, groups, pcfg)` rewrites a full, identically initialised model in place into
this tp rank's shard, Megatron-style (Shoeybi et al. 2019; Korthikanti et al. 2022 for SP):

- q/k/v and gate/up are column-parallel (output rows split, heads stay whole), o/down are
  row-parallel (input columns split) followed by an all-reduce, or a reduce-scatter along the
  sequence under sequence parallel;
- the embedding is vocab-parallel (each rank owns V/tp rows; out-of-range ids give zeros, summed
  over tp), the head is column-parallel over the vocabulary (sharing the embedding shard when
  tied), and the loss is a vocab-parallel cross-entropy, so the (tokens, V) logits never exist
  whole on one rank;
- with sequence parallel, activations between blocks (norms, residual adds) are split along the
  sequence: the attention/MLP inputs are all-gathered, outputs reduce-scattered, and the norm
  weights' gradients are summed over tp after backward (`sequence_parallel` attribute).

Why plain tensors and explicit collectives instead of DTensor or megatron-core's layers: the
shards must be ordinary nn.Parameters so DeepSpeed ZeRO (which flattens and partitions
parameters) and torch pipelining compose with them; megatron-core's layers need its own global
parallel_state and allocate on CUDA (CUDA RNG tracker, fused kernels), so they do not run on gloo.
The modules keep their names and classes (only weights shrink), so checkpoints use the full
model's parameter names and `reshard.py` knows how to join them."""

import types
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ------------------------------------------------------------------------------ collectives
def _gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, S/tp, D) -> (B, S, D), concatenated along the sequence in tp-rank order."""
    x = x.transpose(0, 1).contiguous()
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, S, D) summed over tp, each rank keeping its sequence slice (B, S/tp, D)."""
    x = x.transpose(0, 1).contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x, group=group)
    return out.transpose(0, 1).contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the input gradient is the sum of every tp rank's partial gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of the tp ranks' partial outputs; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _gather_seq(x, group, size)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.group, ctx.size), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _reduce_scatter_seq(x, group, size)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g, ctx.group, ctx.size), None, None


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits (N, V/tp); targets are global ids.
    Max, target logit and the softmax denominator are reduced over tp (Megatron's method)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        logits = logits.float()
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - m.unsqueeze(-1)
        local = targets - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        denom = exp.sum(-1)
        both = torch.stack([picked, denom])
        dist.all_reduce(both, group=group)
        picked, denom = both[0], both[1]
        ctx.save_for_backward(exp.div_(denom.unsqueeze(-1)), local, outside)
        return denom.log() - picked

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= (~outside).to(grad.dtype)
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not ignore_index."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    valid = targets != ignore_index
    losses = _VocabParallelCE.apply(logits, targets.masked_fill(~valid, 0), vocab_start, group)
    return (losses * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------- modules
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the embedding; other ids look up zeros, then tp ranks sum
    (all-reduce), or reduce-scatter along the sequence under sequence parallel."""

    def __init__(self, full: nn.Embedding, tp: int, tp_rank: int, group, sequence_parallel: bool):
        super().__init__()
        per = full.num_embeddings // tp
        self.vocab_start, self.num_local = tp_rank * per, per
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.weight = nn.Parameter(full.weight.detach()[self.vocab_start : self.vocab_start + per].clone())
        self.weight.tensor_model_parallel = True
        self.group, self.tp, self.sequence_parallel = group, tp, sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return _ReduceScatterSeq.apply(out, self.group, self.tp)
        return _ReduceFromTP.apply(out, self.group)


def _shard_linear(lin: nn.Linear, dim: int, tp: int, rank: int) -> None:
    """Keep this rank's slice of the weight: dim 0 = column-parallel (out rows), 1 = row-parallel."""
    w = lin.weight.detach()
    per = w.shape[dim] // tp
    lin.weight = nn.Parameter(w.narrow(dim, rank * per, per).clone())
    lin.weight.tensor_model_parallel = True
    lin.weight.partition_dim = dim
    lin.out_features, lin.in_features = lin.weight.shape


class TPContext:
    """What the hooks and the loss need: the tp group, its size, and whether SP is on."""

    def __init__(self, group, tp: int, sequence_parallel: bool):
        self.group, self.tp, self.sp = group, tp, sequence_parallel

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into a tensor-parallel region (input of column-parallel layers)."""
        return _GatherSeq.apply(x, self.group, self.tp) if self.sp else _CopyToTP.apply(x, self.group)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Out of it (output of row-parallel layers): sum the partial outputs."""
        return _ReduceScatterSeq.apply(x, self.group, self.tp) if self.sp else _ReduceFromTP.apply(x, self.group)

    def pre_hook(self, module, args):
        return (self.enter(args[0]), *args[1:])

    def post_hook(self, module, args, out):
        return self.leave(out)


def _tp_forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, output_hidden_states: bool = False):
    """Llama.forward with a vocab-parallel loss (bound to the instance by `parallelize`)."""
    if output_hidden_states:
        raise ValueError("output_hidden_states is not available under tensor parallel")
    logits = self.head(self.hidden(tokens))  # (B, S, V/tp): the head's pre-hook gathered the sequence
    if targets is None:
        return logits
    return vocab_parallel_cross_entropy(logits, targets, self.embed.vocab_start, self.tp_ctx.group)


def parallelize(model: nn.Module, groups, pcfg) -> nn.Module:
    """Shard `model` (a full sparsetron Llama, same init on every rank) over groups.tp_group."""
    tp, rank = groups.tp, groups.tp_rank
    if tp == 1:
        return model
    ctx = TPContext(groups.tp_group, tp, bool(pcfg.sequence_parallel))
    model.tp_ctx = ctx
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _shard_linear(lin, 0, tp, rank)
        for lin in (attn.o_proj, mlp.down_proj):
            _shard_linear(lin, 1, tp, rank)
            lin.register_forward_hook(ctx.post_hook)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        attn.register_forward_pre_hook(ctx.pre_hook)
        mlp.register_forward_pre_hook(ctx.pre_hook)
        for norm in (block.attn_norm, block.mlp_norm):
            norm.weight.sequence_parallel = ctx.sp
    model.norm.weight.sequence_parallel = ctx.sp
    tied = model.cfg.tie_embeddings
    model.embed = VocabParallelEmbedding(model.embed, tp, rank, ctx.group, ctx.sp)
    if tied:
        model.head.weight = model.embed.weight
        model.head.out_features = model.embed.num_local
    else:
        _shard_linear(model.head, 0, tp, rank)
    model.head.register_forward_pre_hook(ctx.pre_hook)
    model.forward = types.MethodType(_tp_forward, model)
    return model


def sequence_parallel_params(module: nn.Module):
    """Replicated parameters that saw only this rank's part of the sequence (grads summed over tp)."""
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]
