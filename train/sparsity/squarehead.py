"""SquareHead distillation (Kurtic et al. 2023, "Sparse Finetuning for Inference Acceleration of
Large Language Models"): the sparse student matches the frozen dense teacher's logits and every
transformer block's output, each block's MSE normalised by the teacher's own energy so that all
layers weigh the same whatever their scale.

    loss = ce_weight * CE(student, targets)
         + alpha_kl * T^2 * mean_tokens KL(softmax(z_t / T) || softmax(z_s / T))
         + beta_squarehead * sum_l MSE(h_s^l, h_t^l) / MSE(h_t^l, 0)

Tokens whose target is ignore_index are left out of every term (padding, masked prompts).
"""

import copy
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsetron.configs.schema.sparsity import DistillConfig
from sparsetron.parallel.tensor_parallel import vocab_parallel_cross_entropy

from .parallel_loss import TensorParallelLayout, sum_over_tp, vocab_parallel_kl

_EPS = 1e-12  # guards MSE(h_t, 0) of an all-zero block output


class SquareHeadLoss(nn.Module):
    """`layout`: the student is a tensor-parallel shard (parallel_loss.TensorParallelLayout): logits
    split over the vocabulary, block outputs over the tokens under sequence parallel."""

    def __init__(self, cfg: Optional[DistillConfig] = None, ignore_index: int = -100,
                 layout: Optional[TensorParallelLayout] = None):
        super().__init__()
        self.cfg = cfg or DistillConfig()
        self.cfg.validate()
        self.ignore_index = ignore_index
        self.layout = layout

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        targets: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Returns {"loss": differentiable total, "ce", "kl", "squarehead": detached parts}."""
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError(f"SquareHeadLoss: student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
        cfg = self.cfg
        ce, kl, weight = self._head_terms(student_logits, teacher_logits, targets)
        sq = student_logits.new_zeros((), dtype=torch.float32)
        if cfg.beta_squarehead:
            for hs, ht in zip(student_hidden, teacher_hidden):
                sq = sq + self._block_ratio(hs, ht, weight)
        loss = cfg.ce_weight * ce + cfg.alpha_kl * kl + cfg.beta_squarehead * sq
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "squarehead": sq.detach()}

    def _valid_weight(self, tokens_shape, device, targets: Optional[torch.Tensor]) -> torch.Tensor:
        if targets is None:
            return torch.ones(tokens_shape, dtype=torch.bool, device=device).float()
        if targets.shape != tokens_shape:
            raise ValueError(f"SquareHeadLoss: targets {tuple(targets.shape)} must match logits' token dims {tuple(tokens_shape)}")
        return (targets != self.ignore_index).float()

    def _head_terms(self, student_logits, teacher_logits, targets):
        """(ce, kl, per-token weight): the terms on the logits. Tokens whose target is ignore_index count nowhere."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"SquareHeadLoss: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
        cfg, layout = self.cfg, self.layout
        weight = self._valid_weight(student_logits.shape[:-1], student_logits.device, targets)
        count = weight.sum().clamp_min(1.0)
        zero = student_logits.new_zeros((), dtype=torch.float32)

        ce = zero
        if targets is not None and cfg.ce_weight:
            if layout is None:
                ce = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), ignore_index=self.ignore_index)
            else:
                ce = vocab_parallel_cross_entropy(student_logits, targets, layout.vocab_start, layout.group,
                                                  ignore_index=self.ignore_index)

        kl = zero
        if cfg.alpha_kl:
            t = cfg.temperature
            if layout is None:
                log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
                log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
                kl_tok = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
            else:
                kl_tok = vocab_parallel_kl(student_logits.float() / t, teacher_logits.float() / t, layout.group)
            kl = (kl_tok * weight).sum() / count * (t * t)  # T^2 keeps gradient scale as T changes (Hinton)
        return ce, kl, weight

    def _block_ratio(self, hs: torch.Tensor, ht: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """MSE(h_s, h_t) / MSE(h_t, 0) of one block over the valid tokens (the common 1/(count*dim)
        cancels in the ratio; `weight` (B, S): 1 for a valid token, None: all are); sums over the tp
        ranks' token shards under sequence parallel."""
        layout = self.layout
        if weight is None:
            weight = torch.ones(hs.shape[:-1], device=hs.device)
        elif layout is not None and layout.sequence_parallel:
            weight = layout.token_shard(weight, hs)
        w = weight.unsqueeze(-1)
        ht = ht.detach().float()
        mse = ((hs.float() - ht).pow(2) * w).sum()
        energy = (ht.pow(2) * w).sum()
        if layout is not None and layout.sequence_parallel:
            mse = sum_over_tp(mse, layout.group)
            energy = energy.clone()
            dist.all_reduce(energy, group=layout.group)
        return mse / (energy + _EPS)

    # -- the same terms one stage at a time (pipeline parallel: parallel/pipeline.py DistillStage)
    def block_term(self, hs: torch.Tensor, ht: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
        """One block's MSE ratio (unweighted); `targets` (B, S) or None (all tokens count)."""
        weight = None if targets is None else (targets != self.ignore_index).float()
        return self._block_ratio(hs, ht, weight)

    def head_term(self, student_logits, teacher_logits, targets) -> Dict[str, torch.Tensor]:
        """ce_weight * CE + alpha_kl * KL on the logits: {"loss", "ce", "kl"}."""
        ce, kl, _ = self._head_terms(student_logits, teacher_logits, targets)
        return {"loss": self.cfg.ce_weight * ce + self.cfg.alpha_kl * kl, "ce": ce.detach(), "kl": kl.detach()}


def _resolve_dtype(name: str, model: nn.Module) -> Optional[torch.dtype]:
    if name == "auto":
        param = next(model.parameters())
        return torch.bfloat16 if param.is_cuda else None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def make_teacher(model: nn.Module, dtype: str = "auto") -> nn.Module:
    """Frozen copy of the dense model: eval, no grads, bf16 on GPU ("auto"). Call it before
    Sparsifier(model, ...) so the teacher keeps its dense weights."""
    from .sparsify import NMMasked

    sparse = [name for name, mod in model.named_modules() if isinstance(mod, NMMasked)]
    if sparse:
        raise ValueError(f"make_teacher: the model is already sparse ({sparse[0]}, ...); copy the teacher before Sparsifier(model, ...)")
    teacher = copy.deepcopy(model)
    teacher.eval().requires_grad_(False)
    target = _resolve_dtype(dtype, teacher)
    if target is not None:
        teacher.to(target)
    return teacher


class Distiller:
    """Runs teacher (no grad) and student in the same step and returns the SquareHead loss.

    The student is called as `student(tokens, output_hidden_states=True)` (a DDP or DeepSpeed
    wrapper is fine); its MoE auxiliary loss, if any, is added. The teacher is what the engine made of
    the dense copy (engine.shard_frozen): a module, a frozen DeepSpeed engine (ZeRO-3), or under
    pipeline parallel this rank's teacher stages, which the pipeline runs beside the student's and
    feeds to `block_loss` / `head_loss` (the engine's StagedObjective)."""

    def __init__(self, teacher, cfg: Optional[DistillConfig] = None, layout: Optional[TensorParallelLayout] = None):
        self.teacher = teacher
        self.loss_fn = SquareHeadLoss(cfg, layout=layout)
        # kl, squarehead summed over the micro-batches since the last read (pipeline: this rank's stages' part)
        self.sums: Dict[str, torch.Tensor] = {}

    def __call__(self, student: nn.Module, tokens: torch.Tensor, targets: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits, teacher_hidden = self.teacher(tokens, output_hidden_states=True)
        student_logits, student_hidden = student(tokens, output_hidden_states=True)
        out = self.loss_fn(student_logits, teacher_logits, student_hidden, teacher_hidden, targets)
        inner = getattr(student, "module", student)
        aux = inner.aux_loss() if hasattr(inner, "aux_loss") else None
        if aux is not None:
            out["loss"] = out["loss"] + aux
            out["aux"] = aux.detach()
        self._add("kl", out["kl"])
        self._add("squarehead", out["squarehead"])
        return out

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = value.detach() + self.sums[key] if key in self.sums else value.detach()

    def block_loss(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                   targets: Optional[torch.Tensor]) -> torch.Tensor:
        cfg = self.loss_fn.cfg
        if not cfg.beta_squarehead:
            return student_hidden.new_zeros((), dtype=torch.float32)
        ratio = self.loss_fn.block_term(student_hidden, teacher_hidden, targets)
        self._add("squarehead", ratio)
        return cfg.beta_squarehead * ratio

    def head_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.loss_fn.head_term(student_logits, teacher_logits, targets)
        self._add("kl", out["kl"])
        return out
