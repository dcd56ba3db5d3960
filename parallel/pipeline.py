"""Pipeline parallel: the Llama's layers split into stages, run by torch.distributed.pipelining
schedules (which work on gloo, unlike megatron-core 0.16's CUDA-only ones).

Stages: pp * virtual model chunks, stage s holding `pp_layers[s]` consecutive layers (even split
by default); the first also holds the embedding, the last the final norm and head. Placement:
stage s lives on pp rank s % pp (loop: 1F1B, interleaved 1F1B, ZB1P), or on the "V" (rank r holds
stages r and 2pp-1-r) for ZB-V. A stage module keeps the full model's parameter names
("layers.7.attn.q_proj.weight"), so checkpoints and resharding see the same names at any layout.

Tied embeddings across stages: the last stage holds its own copy of the embedding as head.weight
(same initial values); `engine` sums the two gradients over `groups.embed_group` so they stay equal
(Megatron's embedding group).

Distillation (`Pipeline.with_teacher`): each stage runs this rank's stages of a frozen teacher beside
the student's (`DistillStage`); the stages pass student and teacher hidden states on side by side
(concatenated along the feature dim), each stage adds its blocks' part of the objective to the
backward, and the last stage's loss compares the two sets of logits. The teacher is never whole on
a rank: it is split into stages as the student is."""

import collections
import contextlib
import copy
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

SCHEDULE_CLASSES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
}


def stage_layer_counts(n_layers: int, n_stages: int, explicit: Optional[List[int]] = None) -> List[int]:
    if explicit:
        return list(explicit)
    return [n_layers // n_stages] * n_stages


def stage_layers(n_layers: int, n_stages: int, explicit: Optional[List[int]] = None) -> List[List[int]]:
    """Layer ids of each stage."""
    out, start = [], 0
    for count in stage_layer_counts(n_layers, n_stages, explicit):
        out.append(list(range(start, start + count)))
        start += count
    return out


def stages_of_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> List[int]:
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def rank_of_stage(stage: int, pp: int, virtual: int, schedule: str) -> int:
    for r in range(pp):
        if stage in stages_of_rank(r, pp, virtual, schedule):
            return r
    raise ValueError(f"stage {stage} is not placed")


def virtual_stages(pcfg) -> int:
    """Model chunks per pp rank: the config's, or 2 for ZB-V (its V always places two)."""
    return 2 if pcfg.pp_schedule == "zbv" else pcfg.pp_virtual_stages


def local_stage_parts(model: nn.Module, groups, pcfg) -> dict:
    """What this pp rank runs: {"layers": layer ids, "first": holds stage 0, "last": holds the last stage}."""
    pp, v = groups.pp, virtual_stages(pcfg)
    n_stages = pp * v
    layers = stage_layers(model.cfg.n_layers, n_stages, list(pcfg.pp_layers) or None)
    ids = stages_of_rank(groups.pp_rank, pp, v, pcfg.pp_schedule)
    return {"layers": {i for s in ids for i in layers[s]}, "first": 0 in ids, "last": n_stages - 1 in ids}


def free_other_stages(model: nn.Module, parts: dict, keep_embedding: bool = False) -> None:
    """Move what this rank does not run to the meta device (no storage): other stages' layers, the
    embedding unless it holds the first stage (or ``keep_embedding``: a tied head still copies it),
    the final norm and head unless it holds the last."""
    for i, block in enumerate(model.layers):
        if i not in parts["layers"]:
            block.to("meta")
    if not (parts["first"] or keep_embedding):
        model.embed.to("meta")
    if not parts["last"]:
        model.norm.to("meta")
        if not model.cfg.tie_embeddings:
            model.head.to("meta")


def to_device_except_meta(model: nn.Module, device: torch.device) -> nn.Module:
    """model.to(device) for every tensor with storage; meta tensors (freed stages) stay meta."""
    return model._apply(lambda t: t if t.is_meta else t.to(device))


class StageModule(nn.Module):
    """Layers `layer_ids` of `model` (+ embedding on the first stage, norm and head on the last)."""

    def __init__(self, model: nn.Module, layer_ids: List[int], first: bool, last: bool, seq_shards: int):
        super().__init__()
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin  # plain attributes: not saved twice
        self.checkpoint_blocks = model.checkpoint_blocks
        self.first, self.last = first, last
        self.seq_shards = seq_shards  # tp under sequence parallel: hidden states carry S / tp positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def run(self, x: torch.Tensor, hidden_states: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """The stage's forward; appends each block's output to `hidden_states` (Llama.hidden's rule)."""
        s = x.shape[1] if self.first else x.shape[1] * self.seq_shards
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        if self.first:
            x = self.embed(x)
        for block in self.layers.values():
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.last:
            return self.head(self.norm(x))
        return x.contiguous()  # the strides the next stage expects


class _AddLossGradient(torch.autograd.Function):
    """Identity on `out`; in backward the scalar `loss` gets gradient 1 too, so a stage adds the part
    of the loss that lives on it (its blocks' SquareHead terms) to the pipeline's backward (Megatron's
    MoEAuxLossAutoScaler trick). The schedule divides every gradient by the micro-batch count after."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


class DistillStage(nn.Module):
    """A student stage and the teacher's same stage, run side by side. In: tokens (first stage) or
    [student hidden | teacher hidden] along the last dim; out: the same for the next stage, or
    [student logits | teacher logits] on the last. The teacher is not a registered submodule: the
    schedule sees (and scales the gradients of) the student's parameters only."""

    def __init__(self, student: StageModule, teacher: StageModule, objective, width: int):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.objective, self.width = objective, width
        self.teacher_dtype = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), None)
        self.targets: collections.deque = collections.deque()  # per micro-batch, in forward order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.student.first:
            xs = xt = x
        else:
            xs, xt = x[..., : self.width], x[..., self.width:].detach().to(self.teacher_dtype)
        targets = self.targets.popleft() if self.targets else None  # None: the schedule's shape probe
        student_hidden: List[torch.Tensor] = []
        teacher_hidden: List[torch.Tensor] = []
        out = self.student.run(xs, student_hidden)
        with torch.no_grad():
            teacher_out = self.teacher.run(xt, teacher_hidden)
        term = None
        for hs, ht in zip(student_hidden, teacher_hidden):
            part = self.objective.block_loss(hs, ht, targets)
            term = part if term is None else term + part
        out = torch.cat([out, teacher_out.to(out.dtype)], dim=-1)
        if term is not None and torch.is_grad_enabled():
            out = _AddLossGradient.apply(out, term)
        return out


class Pipeline:
    """This rank's stage modules, their PipelineStage wrappers and the schedule of a training step."""

    def __init__(self, model: nn.Module, groups, pcfg, micro_batch: int, seq_len: int, n_micro: int,
                 loss_fn, device: torch.device, dtype: torch.dtype, autocast=contextlib.nullcontext):
        pp, v = groups.pp, virtual_stages(pcfg)
        self.groups, self.schedule_name, self.virtual = groups, pcfg.pp_schedule, v
        self.n_stages = pp * v
        self.layers = stage_layers(model.cfg.n_layers, self.n_stages, list(pcfg.pp_layers) or None)
        self.local_ids = stages_of_rank(groups.pp_rank, pp, v, pcfg.pp_schedule)
        sp = groups.tp if getattr(model, "tp_ctx", None) is not None and model.tp_ctx.sp else 1
        self.seq_shards = sp
        self.first_rank = rank_of_stage(0, pp, v, pcfg.pp_schedule)
        self.last_rank = rank_of_stage(self.n_stages - 1, pp, v, pcfg.pp_schedule)
        self.modules = self.stage_modules_of(model)
        # NCCL: the first operation on a group must involve all of its ranks (torch's batch_isend_irecv
        # docs), and the schedules' first batched send/recv involves two. One all-reduce creates the pp
        # group's communicator on every rank first.
        dist.all_reduce(torch.zeros(1, device=device), group=groups.pp_group)
        self.pcfg, self.n_micro, self.device, self.autocast = pcfg, n_micro, device, autocast
        self.dim, self.micro_batch, self.seq_len = model.cfg.dim, micro_batch, seq_len
        self.hidden_shape, self.hidden_dtype = (micro_batch, seq_len // sp, model.cfg.dim), dtype
        self.stages, self.schedule = self._schedule(self.modules, model.cfg.dim, loss_fn)
        self.loss_fn = loss_fn
        self.distill: Optional[List[DistillStage]] = None

    def stage_modules_of(self, model: nn.Module) -> List[StageModule]:
        """This rank's stages of `model` (the student, or a teacher placed the same way)."""
        return [StageModule(model, self.layers[s], s == 0, s == self.n_stages - 1, self.seq_shards)
                for s in self.local_ids]

    def _schedule(self, submodules: List[nn.Module], width: int, loss_fn, logits_width: Optional[int] = None):
        """PipelineStage wrappers for this rank's stage modules (hidden states `width` wide) and the schedule.
        `logits_width`: the last stage's output is declared too (static metadata: torch then runs no probe
        forward/loss at the first step), else inferred."""
        from torch.distributed.pipelining import PipelineStage

        hidden = torch.empty(self.micro_batch, self.seq_len // self.seq_shards, width, dtype=self.hidden_dtype,
                             device=self.device)
        tokens = torch.zeros(self.micro_batch, self.seq_len, dtype=torch.long, device=self.device)
        if logits_width is not None:  # static metadata says what needs a gradient: the hidden states do
            hidden.requires_grad_(True)
        stages = []
        for s, module in zip(self.local_ids, submodules):
            kwargs = {"input_args": tokens if s == 0 else hidden}
            if s != self.n_stages - 1:
                kwargs["output_args"] = hidden
            elif logits_width is not None:
                with self.autocast():  # the head's output dtype: autocast's, else the parameters'
                    dtype = (torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type)
                             else self.hidden_dtype)
                kwargs["output_args"] = torch.empty(self.micro_batch, self.seq_len, logits_width, dtype=dtype,
                                                    device=self.device, requires_grad=True)
            # The last stage infers its output (logits) by running once: under the training step's autocast, or
            # its meta says fp32, bf16 logits fail torch's output check on that rank alone, and over NCCL the
            # other stages then wait forever (the "pp hang" of the first 4-GPU runs).
            with self.autocast():
                stages.append(PipelineStage(module, s, self.n_stages, self.device, group=self.groups.pp_group,
                                            **kwargs))
        import torch.distributed.pipelining as pipelining

        cls = getattr(pipelining, SCHEDULE_CLASSES[self.pcfg.pp_schedule])
        schedule = cls(stages[0] if cls.__name__ in ("ScheduleGPipe", "Schedule1F1B") else stages,
                       self.n_micro, loss_fn=loss_fn)
        return stages, schedule

    def with_teacher(self, objective) -> "Pipeline":
        """A pipeline over the same student stages that runs `objective.teacher` (this rank's teacher
        stages, from stage_modules_of) beside them and trains on the objective (see DistillStage)."""
        twin = copy.copy(self)
        twin.distill = [DistillStage(student, teacher, objective, self.dim)
                        for student, teacher in zip(self.modules, objective.teacher)]
        twin.objective, twin.ce_values = objective, []
        # static metadata: a probe forward would take a micro-batch's targets from the stages' queues
        vocab = next((m.head.weight.shape[0] for m in self.modules if m.last), 0)
        twin.stages, twin.schedule = self._schedule(twin.distill, 2 * self.dim, twin._distill_loss, 2 * vocab)
        return twin

    def _distill_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        half = output.shape[-1] // 2
        out = self.objective.head_loss(output[..., :half], output[..., half:], target)
        self.ce_values.append(out["ce"].detach().float())
        return out["loss"]

    @property
    def has_first(self) -> bool:
        return 0 in self.local_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.local_ids

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """One forward+backward over all micro-batches (x: (n_micro * mb, S)); grads are the mean
        over micro-batches. Returns the mean loss on the rank holding the last stage, else None
        (distilling: the mean cross-entropy, the logged loss)."""
        losses: List[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        if self.distill is not None:  # every stage needs the targets (ignore_index) of each micro-batch
            self.ce_values = []
            for stage in self.distill:
                stage.targets.clear()
                stage.targets.extend(torch.tensor_split(y, self.n_micro))
        self.schedule.step(*args, target=y if self.has_last else None, losses=losses if self.has_last else None)
        if self.distill is not None:  # one forward per micro-batch and stage, one loss per micro-batch
            left = sum(len(stage.targets) for stage in self.distill)
            if left or (self.has_last and len(self.ce_values) != self.n_micro):
                raise RuntimeError(f"pipeline distillation: {left} micro-batch targets unused and "
                                   f"{len(self.ce_values)} losses for {self.n_micro} micro-batches; the schedule ran "
                                   f"extra or missing forwards (a probe forward of the stages?)")
        if not self.has_last:
            return None
        kept = self.ce_values if self.distill is not None else [loss.detach().float() for loss in losses]
        return torch.stack(kept).mean()

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward-only, stage by stage with point-to-point sends (evaluation)."""
        g, pp, v = self.groups, self.groups.pp, self.virtual
        h, loss = None, None
        for s in range(self.n_stages):
            owner = rank_of_stage(s, pp, v, self.schedule_name)
            prev_owner = rank_of_stage(s - 1, pp, v, self.schedule_name) if s else owner
            if owner != g.pp_rank:
                continue
            if s > 0 and prev_owner != g.pp_rank:
                h = torch.empty(x.shape[0], *self.hidden_shape[1:], dtype=self.hidden_dtype, device=x.device)
                dist.recv(h, src=g.pp_ranks[prev_owner], group=g.pp_group)
            module = self.modules[self.local_ids.index(s)]
            out = module(x if s == 0 else h)
            if s == self.n_stages - 1:
                loss = self.loss_fn(out, y)
            else:
                h = out
                next_owner = rank_of_stage(s + 1, pp, v, self.schedule_name)
                if next_owner != g.pp_rank:
                    dist.send(h.contiguous(), dst=g.pp_ranks[next_owner], group=g.pp_group)
        return loss

    def parameters(self):
        seen = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def named_parameters(self):
        out = {}
        for m in self.modules:
            for name, p in m.named_parameters():
                out.setdefault(name, p)
        return out
