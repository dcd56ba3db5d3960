"""The SquareHead terms when student and teacher are tensor-parallel shards (parallel/tensor_parallel.py):
logits split over the vocabulary (B, S, V/tp), and under sequence parallel the block outputs split
over the tokens (B, S/tp, D). Each tp rank computes the same loss value; its backward yields the
gradient of its own shard, as megatron's vocab-parallel cross-entropy does."""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelLayout:
    """How the student's outputs are split: the tp group, its size and this rank's place in it, the
    first vocabulary row of this rank's logits, and whether block outputs are token shards (SP)."""

    group: object
    tp: int
    rank: int
    vocab_start: int
    sequence_parallel: bool

    @classmethod
    def of(cls, model) -> "TensorParallelLayout | None":
        """The layout of a model `parallelize` sharded (None when it was not)."""
        ctx = getattr(model, "tp_ctx", None)
        if ctx is None:
            return None
        return cls(ctx.group, ctx.tp, dist.get_rank(ctx.group), model.embed.vocab_start, bool(ctx.sp))

    def token_shard(self, per_token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's part of a (B, S) per-token tensor under sequence parallel: rank r holds tokens
        [r*N/tp, (r+1)*N/tp) of the row-major (B, S) order (tensor_parallel.py), shaped as `hidden`."""
        if not self.sequence_parallel:
            return per_token
        flat = per_token.reshape(-1)
        per = flat.numel() // self.tp
        return flat[self.rank * per:(self.rank + 1) * per].reshape(hidden.shape[:-1])


class _SumOverTensorParallel(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: a partial sum every tp rank then uses whole in a
    loss that every rank computes alike (megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverTensorParallel.apply(x, group)


def _log_softmax_over_vocab(z: torch.Tensor, group) -> torch.Tensor:
    """log_softmax along the last dim of vocab-split logits (max and sum-exp reduced over the group)."""
    top = z.max(dim=-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = z - top
    total = shifted.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(total, group=group)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL(softmax(zt) || softmax(zs)) from vocab-split fp32 logits; gradient to zs only:
    softmax(zs) - softmax(zt), on this rank's vocabulary slice."""

    @staticmethod
    def forward(ctx, zs: torch.Tensor, zt: torch.Tensor, group) -> torch.Tensor:
        log_ps = _log_softmax_over_vocab(zs, group)
        log_pt = _log_softmax_over_vocab(zt, group)
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum(dim=-1)
        dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_ps, pt)
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_ps, pt = ctx.saved_tensors
        return grad.unsqueeze(-1) * (log_ps.exp() - pt), None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, group) -> torch.Tensor:
    """(B, S) KL(teacher || student) per token; logits (B, S, V/tp), already divided by the temperature."""
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), group)
