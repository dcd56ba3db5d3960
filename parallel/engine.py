"""Engines: how one optimizer step runs over the ranks, and what a checkpoint holds.

The trainer owns the loop (data order, schedule, logging, checkpoint timing); an engine owns the
forward/backward/optimizer of a step for one parallel layout. `build_engine` picks one from the
config. DataParallelEngine covers one process and plain DDP."""

import contextlib
from typing import Dict, List, Tuple

import torch

from .runtime import Runtime

Batch = Tuple[torch.Tensor, torch.Tensor]


def autocast_factory(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class DataParallelEngine:
    """One process, or DDP over all ranks (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: torch.nn.Module, cfg, runtime: Runtime):
        from sparsetron.train.optim import build_optimizer

        self.cfg, self.rt = cfg, runtime
        self.model = model.to(runtime.device)  # unwrapped: eval, export, checkpoints
        self.optimizer = build_optimizer(self.model, cfg.optim, runtime.device)
        self.dp_rank, self.dp_size = runtime.rank, runtime.world_size
        self.autocast = autocast_factory(cfg.train.precision, runtime.device)
        self.wrapped = self.model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)

    def train_step(self, batches: List[Batch], lr: float) -> Dict[str, float]:
        self.wrapped.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.rt.device)
        n = len(batches)
        for i, (x, y) in enumerate(batches):
            sync = i == n - 1 or not self.rt.distributed
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self.autocast():
                loss = self.wrapped(x, y)
                aux = self.model.aux_loss()
                objective = loss if aux is None else loss + aux
            (objective / n).backward()
            total += loss.detach()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": self.rt.all_reduce_mean(total / n).item(), "grad_norm": grad_norm.item()}

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.wrapped.eval()
        with self.autocast():
            return self.model(x, y).float()

    # -- checkpoints: every rank holds everything, so rank 0 writes one copy
    def checkpoint_files(self) -> Dict[str, object]:
        from sparsetron.train.checkpoint import unique_tensors

        return {"model.safetensors": unique_tensors(self.model.state_dict()), "optimizer.pt": self.optimizer.state_dict()}

    def load_checkpoint(self, path: str) -> None:
        from sparsetron.train import checkpoint as ckpt

        ckpt.load_model_weights(self.model, ckpt.read_tensors(path, "model.safetensors"), path)
        try:
            self.optimizer.load_state_dict(ckpt.read_torch(path, "optimizer.pt", self.rt.device))
        except (ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"{path}/optimizer.pt does not fit this optimizer ({err})") from None

    def compile_blocks(self) -> None:
        for block in self.model.layers:
            block.compile()


def build_engine(model: torch.nn.Module, cfg, runtime: Runtime):
    return DataParallelEngine(model, cfg, runtime)
