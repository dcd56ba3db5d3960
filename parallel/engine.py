"""Engines: how one optimizer step runs over the ranks, and what a checkpoint holds.

The trainer owns the loop (data order, schedule, logging, checkpoint timing); an engine owns the
forward/backward/optimizer of a step for one parallel layout. `build_engine` builds the process
groups (groups.py) and picks one engine from the config (legality.resolve_engine):

- DataParallelEngine: one process, or plain DDP (tp = pp = 1, no ZeRO);
- NativeEngine (native.py): tensor/sequence/pipeline/expert parallel, DP by gradient all-reduce,
  ZeRO-1 through torch's ZeroRedundancyOptimizer;
- DeepSpeedEngine (deepspeed_engine.py): ZeRO 0-3 and CPU/NVMe offload, with or without TP.

Every engine follows the `Engine` protocol and runs the one training step of engine_protocol.py
(`StepLoop.train_step` -> {loss, grad_norm, skipped}; skipped: the non-finite guard, agree_finite,
dropped the update on every rank); eval_loss(x, y); save_checkpoint(dir) and load_checkpoint(path)
(collective; formats in reshard.py); dp_rank / dp_size; model."""

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .engine_protocol import Batch, Engine, StepLoop, agree_finite, autocast_factory
from .groups import ParallelGroups, build_groups
from .runtime import Runtime
from .sharded_state import ShardedStateMixin


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on t's device; isfinite in 16M-element slices, so no full-size temporary (a large
    embedding's bool mask would be hundreds of MB on a GPU that is full at checkpoint time)."""
    return torch.stack([torch.isfinite(part).all() for part in t.detach().reshape(-1).split(1 << 24)]).all()


def first_nonfinite(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name of the first floating tensor holding a NaN/Inf (None if all finite): refuses a checkpoint.
    One host sync per device, not one per tensor."""
    names, flags = [], []
    for name, t in named_tensors:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            names.append(name)
            flags.append(_all_finite(t))
    by_device: Dict[torch.device, List[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    bad = [i for idx in by_device.values() for i, ok in zip(idx, torch.stack([flags[i] for i in idx]).tolist())
           if not ok]
    return names[min(bad)] if bad else None


def optimizer_state_tensors(optimizer, names: Dict[int, str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of an optimizer's master weights and state (moments), unwrapping ZeRO wrappers."""
    inner = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None) or optimizer
    for group in inner.param_groups:
        for prm in group["params"]:
            label = names.get(id(prm), "master")
            yield f"optimizer master weight {label}", prm
            for key, value in inner.state.get(prm, {}).items():
                yield f"optimizer {key} of {label}", value


def state_tensors(engine) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint of `engine` holds on this rank: parameters (ZeRO-3: this rank's
    partition), then the optimizer's master weights and moments."""
    modules = engine.local_modules() if hasattr(engine, "local_modules") else [engine.model]
    for module in modules:
        for name, prm in module.named_parameters():
            yield name, getattr(prm, "ds_tensor", prm)
    yield from optimizer_state_tensors(engine.optimizer, getattr(engine, "param_names", {}))


class DataParallelEngine(StepLoop, ShardedStateMixin):
    """One process, or DDP over all ranks (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: torch.nn.Module, cfg, runtime: Runtime, groups: ParallelGroups = None):
        from sparsetron.train.optim import build_optimizer

        self.cfg, self.rt = cfg, runtime
        self.g = groups or ParallelGroups(dp=runtime.world_size, rank=runtime.rank, dp_rank=runtime.rank)
        self.model = model.to(runtime.device)  # unwrapped: eval, export, checkpoints
        self.optimizer = build_optimizer(self.model, cfg.optim, runtime.device)
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        self.dp_rank, self.dp_size = runtime.rank, runtime.world_size
        self.autocast = autocast_factory(cfg.train.precision, runtime.device)
        self._init_plugins()
        self.wrapped = self.model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)

    # -- the step's pieces (engine_protocol.StepLoop): DDP all-reduces in the last micro-batch's backward
    def _train_mode(self) -> None:
        self.wrapped.train()

    def _forward_module(self):
        return self.wrapped

    def _sync_context(self, last: bool):
        return contextlib.nullcontext() if last or not self.rt.distributed else self.wrapped.no_sync()

    def _dp_mean(self, loss: torch.Tensor) -> torch.Tensor:
        return self.rt.all_reduce_mean(loss)

    def shard_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the model (distillation teacher), placed like the student: whole, on the device."""
        return module.to(self.rt.device)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.wrapped.eval()
        with self.autocast():
            return self.model(x, y).float()

    # -- checkpoints (sharded_state.py): every rank holds everything, so dp rank 0 writes one copy
    def local_modules(self):
        return [self.model]

    def layout_info(self) -> dict:
        return {"tp": 1, "pp": 1, "dp": self.dp_size, "cp": 1, "ep": 1, "zero_stage": 0, "engine": "native",
                "stages": None}

    def compile_blocks(self) -> None:
        for block in self.model.layers:
            block.compile()


def build_engine(model: torch.nn.Module, cfg, runtime: Runtime) -> Engine:
    """Process groups for cfg.parallel (legality was checked by validate), then the engine."""
    from .legality import resolve_engine

    p = cfg.parallel
    groups = build_groups(p, runtime)
    kind = resolve_engine(p)
    if kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, runtime, groups)
    if groups.tp == groups.pp == groups.ep == groups.cp == 1 and p.zero_stage == 0:  # cp: native (context_parallel.py)
        return DataParallelEngine(model, cfg, runtime, groups)
    from .native import NativeEngine

    return NativeEngine(model, cfg, runtime, groups)


__all__ = ["Batch", "DataParallelEngine", "Engine", "agree_finite", "autocast_factory", "build_engine",
           "first_nonfinite", "optimizer_state_tensors", "state_tensors"]
