"""The process's place in the job: rank, world, device, and the default process group.

Started once per process (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR); a single process
without those variables needs no process group at all."""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor, group=None) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            t /= dist.get_world_size(group)
        return t


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(device: str = "auto", backend: str = "auto", timeout_s: Optional[float] = None) -> Runtime:
    from sparsetron.parallel.slurm_env import apply_slurm_env
    from sparsetron.train.resilience import dist_timeout

    apply_slurm_env()  # ranks started by srun/submitit without torchrun; a no-op under torchrun
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world == 1:
        return Runtime(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        timeout = dist_timeout() if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return Runtime(rank, world, local_rank, dev, backend)


def shutdown(runtime: Runtime, failed: bool = False) -> None:
    """Tear down the default group. After an error (``failed``) an NCCL group is aborted instead:
    destroy_process_group waits for this rank's pending collectives, which a peer that is itself
    waiting on this rank never completes."""
    if not (runtime.distributed and dist.is_initialized()):
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # private; in torch 2.11 and 2.13
    if failed and runtime.backend == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()
