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
import torch.nn.functional as F
from torch import nn

from sparsetron.configs.schema.sparsity import DistillConfig

_EPS = 1e-12  # guards MSE(h_t, 0) of an all-zero block output


class SquareHeadLoss(nn.Module):
    def __init__(self, cfg: Optional[DistillConfig] = None, ignore_index: int = -100):
        super().__init__()
        self.cfg = cfg or DistillConfig()
        self.cfg.validate()
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        targets: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Returns {"loss": differentiable total, "ce", "kl", "squarehead": detached parts}."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"SquareHeadLoss: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError(f"SquareHeadLoss: student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
        cfg = self.cfg
        tokens_shape = student_logits.shape[:-1]
        if targets is None:
            valid = torch.ones(tokens_shape, dtype=torch.bool, device=student_logits.device)
        else:
            if targets.shape != tokens_shape:
                raise ValueError(f"SquareHeadLoss: targets {tuple(targets.shape)} must match logits' token dims {tuple(tokens_shape)}")
            valid = targets != self.ignore_index
        weight = valid.float()
        count = weight.sum().clamp_min(1.0)
        zero = student_logits.new_zeros((), dtype=torch.float32)

        ce = zero
        if targets is not None and cfg.ce_weight:
            ce = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), ignore_index=self.ignore_index)

        kl = zero
        if cfg.alpha_kl:
            t = cfg.temperature
            log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
            log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
            kl_tok = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
            kl = (kl_tok * weight).sum() / count * (t * t)  # T^2 keeps gradient scale as T changes (Hinton)

        sq = zero
        if cfg.beta_squarehead:
            w = weight.unsqueeze(-1)
            for hs, ht in zip(student_hidden, teacher_hidden):
                ht = ht.detach().float()
                mse = ((hs.float() - ht).pow(2) * w).sum()
                energy = (ht.pow(2) * w).sum()
                sq = sq + mse / (energy + _EPS)  # the common 1/(count*dim) cancels in the ratio

        loss = cfg.ce_weight * ce + cfg.alpha_kl * kl + cfg.beta_squarehead * sq
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "squarehead": sq.detach()}


def _resolve_dtype(name: str, model: nn.Module) -> Optional[torch.dtype]:
    if name == "auto":
        param = next(model.parameters())
        return torch.bfloat16 if param.is_cuda else None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def make_teacher(model: nn.Module, dtype: str = "auto") -> nn.Module:
    """Frozen copy of the dense model: eval, no grads, bf16 on GPU ("auto"). Call it before
    Sparsifier(model, ...) so the teacher keeps its dense weights."""
    from .sparsify import NMSparseLinear

    sparse = [name for name, mod in model.named_modules() if isinstance(mod, NMSparseLinear)]
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

    The student is called as `student(tokens, output_hidden_states=True)` (a DDP/FSDP wrapper
    is fine); its MoE auxiliary loss, if any, is added."""

    def __init__(self, teacher: nn.Module, cfg: Optional[DistillConfig] = None):
        self.teacher = teacher
        self.loss_fn = SquareHeadLoss(cfg)

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
        return out
