"""The native engine: tensor (+ sequence) parallel, pipeline parallel (torch pipelining schedules),
data parallel by explicit gradient all-reduce, ZeRO-1 through torch's ZeroRedundancyOptimizer, and
expert parallel for MoE. Plain PyTorch on gloo or NCCL.

After backward, `finalize_grads` does what Megatron's finalize_model_grads does: sums the
sequence-parallel norm gradients over tp, sums the tied-embedding gradients of the first and last
pipeline stage, and averages over data parallel (expert weights over their expert-dp group)."""

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .engine_protocol import StepLoop, autocast_factory
from .groups import ParallelGroups
from .runtime import Runtime
from .sharded_state import ShardedStateMixin
from .tensor_parallel import parallelize, sequence_parallel_params, vocab_parallel_cross_entropy


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _all_reduce_flat(tensors: List[torch.Tensor], group, scale: float = 1.0) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def global_grad_norm(params, g: ParallelGroups) -> torch.Tensor:
    """L2 norm of the gradients of the whole model: tp-sharded tensors summed over tp, replicated
    ones counted on tp rank 0, stages summed over pp, expert shards over ep (grads already dp-synced)."""
    device = None
    dense, expert = 0.0, 0.0
    for prm in params:
        if prm.grad is None:
            continue
        device = prm.grad.device
        sq = prm.grad.detach().double().pow(2).sum()
        if getattr(prm, "expert_parallel", False):
            expert = expert + sq
        elif getattr(prm, "tensor_model_parallel", False) or g.tp_rank == 0:
            dense = dense + sq
    both = torch.tensor([float(dense), float(expert)], dtype=torch.float64, device=device)
    if g.tp > 1:
        dist.all_reduce(both, group=g.tp_group)
    if g.pp > 1:
        dist.all_reduce(both, group=g.pp_group)
    if g.ep > 1:  # each ep rank holds different experts
        e = both[1:].clone()
        dist.all_reduce(e, group=g.ep_group)
        both = torch.cat([both[:1], e])
    return both.sum().sqrt().float()


class NativeEngine(StepLoop, ShardedStateMixin):
    def __init__(self, model: nn.Module, cfg, runtime: Runtime, groups: ParallelGroups):
        from sparsetron.parallel.legality import micro_batches_per_step

        self.cfg, self.rt, self.g = cfg, runtime, groups
        p, t = cfg.parallel, cfg.train
        # Shard where the model was built (the host when it is too big for one GPU, see trainer.init_device),
        # then move only this rank's part: TP slices first, other pipeline stages freed before the move.
        parallelize(model, groups, p)
        if groups.cp > 1:  # sequences split over cp: K/V gathered per layer (context_parallel.py)
            from .context_parallel import apply_context_parallel

            apply_context_parallel(model, groups)
        if groups.pp > 1:
            from .pipeline import free_other_stages, local_stage_parts, to_device_except_meta

            parts = local_stage_parts(model, groups, p)
            free_other_stages(model, parts, keep_embedding=model.cfg.tie_embeddings and parts["last"])
            self.model = to_device_except_meta(model, runtime.device)
        else:
            self.model = model.to(runtime.device)
        self.dp_rank, self.dp_size = groups.dp_rank, groups.dp
        self.autocast = autocast_factory(t.precision, runtime.device)
        self._init_plugins()
        if groups.ep > 1:
            for m in self.model.modules():
                if hasattr(m, "set_ep_group"):
                    m.set_ep_group(groups.ep_group)
                    for w in (m.gate_up_proj.weight, m.down_proj.weight):
                        w.expert_parallel = True
        self.pipe = None
        self.tied_copy = None
        if groups.pp > 1:
            self._build_pipeline(micro_batches_per_step(t, groups.dp))
        self.param_names = {id(prm): name for name, prm in self._named_local_params().items()}
        if self.tied_copy is not None:
            self.param_names[id(self.tied_copy)] = "embed.weight"
        self.optimizer = self._build_optimizer()

    # ------------------------------------------------------------------------------ setup
    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.g.tp > 1:
            return vocab_parallel_cross_entropy(logits, targets, self.model.embed.vocab_start, self.g.tp_group)
        return _ce(logits, targets)

    def _build_pipeline(self, n_micro: int) -> None:
        from .pipeline import Pipeline

        t, model = self.cfg.train, self.model
        dtype = next(model.parameters()).dtype
        self.pipe = Pipeline(model, self.g, self.cfg.parallel, t.micro_batch_size, t.seq_len, n_micro,
                             self._loss_fn, self.rt.device, dtype, self.autocast)
        if model.cfg.tie_embeddings and self.pipe.has_last:
            # the head gets its own copy, its gradient summed with the embedding's after backward (over
            # embed_group, or locally when ZB-V puts both ends on one rank: torch's split dW backward
            # mishandles one parameter shared by two stages of a rank)
            self.tied_copy = nn.Parameter(model.embed.weight.detach().clone())
            model.head.weight = self.tied_copy
        if not self.pipe.has_first:
            model.embed.to("meta")  # kept until here only for the tied head's copy

    def local_modules(self) -> List[nn.Module]:
        return list(self.pipe.modules) if self.pipe else [self.model]

    def _named_local_params(self) -> Dict[str, nn.Parameter]:
        out: Dict[str, nn.Parameter] = {}
        for module in self.local_modules():
            for name, prm in module.named_parameters():
                if prm is not self.tied_copy:
                    out.setdefault(name, prm)
        return out

    def _params(self) -> List[nn.Parameter]:
        params = list(self._named_local_params().values())
        return params + ([self.tied_copy] if self.tied_copy is not None else [])

    def _build_optimizer(self):
        from sparsetron.train.optim import build_optimizer

        holder = nn.Module()
        holder.params = nn.ParameterList(self._params())
        opt = build_optimizer(holder, self.cfg.optim, self.rt.device)
        if self.cfg.parallel.zero_stage == 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            o = self.cfg.optim
            zero = ZeroRedundancyOptimizer(opt.param_groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                           process_group=self.g.dp_group, lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, weight_decay=o.weight_decay)
            zero.add_param_group({"params": opt.param_groups[1]["params"], "weight_decay": 0.0})
            return zero
        return opt

    def layout_info(self) -> dict:
        p = self.cfg.parallel
        stages = None
        if self.pipe is not None:
            stages = [[s, self.pipe.layers[s]] for s in range(self.pipe.n_stages)]
        return {"tp": self.g.tp, "pp": self.g.pp, "dp": self.g.dp, "cp": self.g.cp, "ep": self.g.ep,
                "zero_stage": p.zero_stage, "engine": "native", "sequence_parallel": bool(p.sequence_parallel),
                "pp_schedule": p.pp_schedule if self.pipe else None, "stages": stages}

    # ------------------------------------------------------------------------------- steps
    # the step itself is engine_protocol.StepLoop.train_step; here: what differs for this engine
    def _forward_backward(self, batches) -> torch.Tensor:
        if self.pipe is None:
            return super()._forward_backward(batches)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        if self.objective is not None:  # the teacher runs beside the student, stage by stage
            self._ensure_distill_pipeline()
            with self.autocast():
                loss = self.distill_pipe.train_step(x, y)
        else:
            with self.autocast():
                loss = self.pipe.train_step(x, y)
        return self._from_last_stage(loss)

    def _sync_grads(self) -> None:
        self.finalize_grads()

    def _clip_grads(self) -> torch.Tensor:
        return self.clip_grads(self.cfg.optim.grad_clip)

    def shard_frozen(self, module: nn.Module):
        """A frozen copy of the dense model (distillation teacher), placed as the student is: TP-sharded,
        and under PP only this rank's stages kept (a list of StageModules, run beside the student's)."""
        parallelize(module, self.g, self.cfg.parallel)
        if self.pipe is None:
            return module.to(self.rt.device)
        from .pipeline import free_other_stages, local_stage_parts, to_device_except_meta

        parts = local_stage_parts(module, self.g, self.cfg.parallel)
        free_other_stages(module, parts, keep_embedding=module.cfg.tie_embeddings and parts["last"])
        return self.pipe.stage_modules_of(to_device_except_meta(module, self.rt.device))

    def _ensure_distill_pipeline(self) -> None:
        """The pipeline whose stages run teacher and student side by side (built once per objective)."""
        if getattr(self, "_distill_objective", None) is self.objective:
            return
        for needed in ("teacher", "block_loss", "head_loss"):
            if not hasattr(self.objective, needed):
                raise TypeError(f"pipeline parallel runs an objective stage by stage: it needs `{needed}` "
                                f"(engine_protocol.StagedObjective), {type(self.objective).__name__} has none")
        self.distill_pipe = self.pipe.with_teacher(self.objective)
        self._distill_objective = self.objective

    def forward_only(self, tokens: torch.Tensor) -> None:
        if self.pipe is None:
            return super().forward_only(tokens)
        for m in self.local_modules():
            m.eval()
        with torch.no_grad(), self.autocast():
            self.pipe.forward_loss(tokens, tokens)  # the loss is not used: the stages' layers saw their inputs

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for m in self.local_modules():
            m.eval()
        with self.autocast():
            if self.pipe is not None:
                return self._from_last_stage(self.pipe.forward_loss(x, y))
            return self.model(x, y).float()

    def _from_last_stage(self, loss) -> torch.Tensor:
        if self.pipe is None or self.g.pp == 1:
            return loss
        buf = loss.detach().float().reshape(()) if loss is not None else torch.zeros((), device=self.rt.device)
        dist.broadcast(buf, src=self.g.pp_ranks[self.pipe.last_rank], group=self.g.pp_group)
        return buf

    # ---------------------------------------------------------------------------- gradients
    def finalize_grads(self) -> None:
        g = self.g
        params = self._params()
        for prm in params:
            if prm.grad is None:  # every rank must join the same collectives
                prm.grad = torch.zeros_like(prm)
        if g.tp > 1:
            sp = [prm.grad for m in self.local_modules() for prm in sequence_parallel_params(m)]
            _all_reduce_flat(list({id(t): t for t in sp}.values()), g.tp_group)
        if self.pipe is not None and self.model.cfg.tie_embeddings:
            if self.pipe.has_first and self.pipe.has_last:
                total = self.model.embed.weight.grad + self.tied_copy.grad
                self.model.embed.weight.grad.copy_(total)
                self.tied_copy.grad.copy_(total)
            elif self.pipe.has_first or self.pipe.has_last:  # the two copies live on two ranks
                shared = self.tied_copy if self.tied_copy is not None else self.model.embed.weight
                _all_reduce_flat([shared.grad], g.embed_group)
        if g.dp * g.cp > 1:
            dense = [prm.grad for prm in params if not getattr(prm, "expert_parallel", False)]
            experts = [prm.grad for prm in params if getattr(prm, "expert_parallel", False)]
            # cp ranks hold parts of the same sequences: replicated weights average over dp x cp
            _all_reduce_flat(dense, g.dp_cp_group if g.cp > 1 else g.dp_group, 1.0 / (g.dp * g.cp))
            if experts and g.dp // g.ep > 1:
                _all_reduce_flat(experts, g.expert_dp_group, 1.0 / g.dp)
            elif experts:
                for t in experts:
                    t.mul_(1.0 / g.dp)

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over all shards (each tensor counted once), then clip to max_norm (0: off)."""
        norm = global_grad_norm(self._named_local_params().values(), self.g)
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for prm in self._params():
                prm.grad.mul_(coef)
        return norm

    def compile_blocks(self) -> None:
        for m in self.local_modules():
            for block in (m.layers.values() if isinstance(m.layers, nn.ModuleDict) else m.layers):
                block.compile()


__all__ = ["NativeEngine"]
