"""The engine interface, and the one training step every engine runs.

An engine owns the forward/backward/optimizer of a step for one parallel layout (engine.py: DDP;
native.py: TP/SP/PP/EP/ZeRO-1; deepspeed_engine.py: ZeRO 0-3 + offload). `StepLoop.train_step` is
the step, written once here:

    for each micro-batch (the pipeline schedule runs them itself under PP):
        forward under autocast -> CE [+ MoE aux], or objective(model, x, y) -> {"loss", "ce"}
        backward of loss / n    (gradient sync only on the last micro-batch where the engine can)
    gradient sync that backward did not do      (native: finalize_grads)
    step_hooks: before_optimizer_step()         (N:M: SR-STE decay)
    clip; loss averaged over dp; non-finite on any rank? (agree_finite) -> skip the update
    optimizer step; step_hooks: after_optimizer_step()   (N:M: masks recomputed)

Engines fill in only what differs: the module the forward goes through (`_forward_module`), the
sync context of a micro-batch, the backward call, the gradient sync after it, clipping, the
optimizer step and the checkpoint/state code.

Plug-ins (the N:M recipe, train/sparsity/recipe.py, uses both): `engine.objective` replaces the
loss of a micro-batch, `engine.step_hooks` run around the optimizer step; `engine.shard_frozen`
places a frozen copy of the model (the distillation teacher) the way the student is placed."""

import contextlib
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Protocol, Tuple

import torch
from torch import nn

from .groups import ParallelGroups
from .runtime import Runtime

Batch = Tuple[torch.Tensor, torch.Tensor]


class Objective(Protocol):
    """Loss of one micro-batch in place of the model's CE: {"loss": what backward runs on (MoE aux
    included), "ce": the cross-entropy that is logged as the step's loss}."""

    def __call__(self, model: Any, tokens: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]: ...


class StagedObjective(Objective, Protocol):
    """An objective a pipeline can run stage by stage (native.py, pp > 1): a term per block output
    and a term on the logits, teacher and student side by side. `teacher` is what
    `engine.shard_frozen` returned (this rank's teacher stages)."""

    teacher: Any

    def block_loss(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                   targets: Optional[torch.Tensor]) -> torch.Tensor: ...

    def head_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor) -> Dict[str, torch.Tensor]: ...


class StepHook(Protocol):
    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self) -> None: ...


class Engine(Protocol):
    """What the trainer, the checkpoint code and the plug-ins use of an engine."""

    model: nn.Module  # unwrapped (TP-sharded / pipeline-freed where the layout says so)
    optimizer: Any
    g: ParallelGroups
    dp_rank: int
    dp_size: int
    objective: Optional[Objective]
    step_hooks: List[StepHook]
    # False where gradients live in the engine's own partitioned buffers (DeepSpeed ZeRO) and not in
    # param.grad at before_optimizer_step(): a hook that edits gradients must do it inside backward.
    grads_in_params: bool
    micro_batches: int  # per optimizer step (gradient accumulation steps)

    def train_step(self, batches: List[Batch], lr: float) -> Dict[str, float]: ...

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def local_modules(self) -> List[nn.Module]: ...

    def layout_info(self) -> dict: ...

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...

    def compile_blocks(self) -> None: ...

    def shard_frozen(self, module: nn.Module) -> Any: ...

    def full_params(self, params: List[nn.Parameter]) -> ContextManager: ...

    def forward_only(self, tokens: torch.Tensor) -> None: ...


def agree_finite(runtime: Runtime, *values: torch.Tensor) -> bool:
    """The non-finite guard's one decision, shared by every engine: True on every rank iff every value
    (loss, gradient norm) is finite on every rank. One MIN all-reduce over the world, so all ranks skip
    the same optimizer step together (a rank that stepped alone would silently fork the replicas)."""
    flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().to(torch.int32).reshape(1)
    if runtime.distributed:
        import torch.distributed as dist

        flag = flag.to(runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def autocast_factory(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class StepLoop:
    """`train_step`, written once; the engines supply the underscored pieces below. Needs: self.rt,
    self.g, self.cfg, self.model, self.optimizer, self.autocast."""

    objective: Optional[Objective] = None
    grads_in_params = True

    def _init_plugins(self) -> None:
        # objective(model, x, y) -> {"loss" (backward), "ce" (logged)}; step hooks get before_optimizer_step()
        # after the last backward and gradient sync, after_optimizer_step() after the step
        self.objective = None
        self.step_hooks: list = []

    # -------------------------------------------------------------------------------- the step
    def train_step(self, batches: List[Batch], lr: float) -> Dict[str, float]:
        self._train_mode()
        for group in self._param_groups():
            group["lr"] = lr
        loss = self._forward_backward(batches)  # mean over this rank's micro-batches
        self._sync_grads()
        for hook in self.step_hooks:
            hook.before_optimizer_step()
        grad_norm = self._clip_grads()
        loss = self._dp_mean(loss)
        norm = [] if grad_norm is None else [grad_norm if torch.is_tensor(grad_norm) else torch.as_tensor(float(grad_norm))]
        finite = agree_finite(self.rt, loss, *norm)
        self._optimizer_step(finite)  # else the non-finite guard skips the update (the trainer reports it)
        for hook in self.step_hooks:
            hook.after_optimizer_step()
        return {"loss": loss.item(), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not finite}

    def _forward_backward(self, batches: List[Batch]) -> torch.Tensor:
        """The micro-batch loop: forward, loss, backward of loss / n; returns the mean logged loss."""
        total = torch.zeros((), device=self.rt.device)
        n = len(batches)
        for i, (x, y) in enumerate(batches):
            with self._sync_context(i == n - 1), self.autocast():
                objective, loss = self._micro_batch_loss(x, y)
            self._backward(objective, i, n)
            total += loss.detach().float()
        return total / n

    def _micro_batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        module = self._forward_module()
        if self.objective is None:
            loss = module(x, y)
            aux = self.model.aux_loss()
            return (loss if aux is None else loss + aux), loss
        out = self.objective(module, x, y)
        return out["loss"], out["ce"]

    # ------------------------------------------------------------ what an engine may change
    def _train_mode(self) -> None:
        for m in self.local_modules():
            m.train()

    def _param_groups(self) -> Iterable[dict]:
        return self.optimizer.param_groups

    def _forward_module(self):
        """What a micro-batch's forward calls (a DDP or DeepSpeed wrapper, or the model)."""
        return self.model

    def _sync_context(self, last: bool) -> ContextManager:
        """Around a micro-batch's forward: DDP skips its gradient all-reduce but on the last one."""
        return contextlib.nullcontext()

    def _backward(self, objective: torch.Tensor, index: int, n: int) -> None:
        (objective / n).backward()

    def _sync_grads(self) -> None:
        """Gradient sync that backward did not do (before the step hooks see the gradients)."""

    def _clip_grads(self) -> Optional[torch.Tensor]:
        clip = self.cfg.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))

    def _dp_mean(self, loss: torch.Tensor) -> torch.Tensor:
        if self.g.dp == 1:
            return loss
        import torch.distributed as dist

        loss = loss.detach().clone()
        dist.all_reduce(loss, group=self.g.dp_group)
        return loss / self.g.dp

    def _optimizer_step(self, finite: bool) -> None:
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --------------------------------------------------------------------- plug-in support
    @property
    def micro_batches(self) -> int:
        from .legality import micro_batches_per_step

        return micro_batches_per_step(self.cfg.train, self.g.dp)

    def full_params(self, params: List[nn.Parameter]) -> ContextManager:
        """Read access to the full values of `params` (ZeRO-3 gathers its partitions; others hold them)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        """One forward of `tokens` (no loss, no grad) with every rank of the layout taking part (Wanda
        calibration: hooks on the layers see their inputs)."""
        for m in self.local_modules():
            m.eval()
        with self.autocast():
            self.model(tokens)


__all__ = ["Batch", "Engine", "Objective", "StagedObjective", "StepHook", "StepLoop", "agree_finite",
           "autocast_factory"]
