"""Does torch.distributed.pipelining itself run on this host's backend? A toy MLP pipeline
(no sparsetron code), 1F1B and interleaved 1F1B over every rank, 3 steps each; bisects a pipeline
hang between torch/NCCL and sparsetron. Stacks go to stderr if a step is stuck for 45 s.

    torchrun --standalone --nproc-per-node=4 benchmarks/scaling/pp_probe.py
"""

import datetime
import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    faulthandler.dump_traceback_later(45, repeat=True, file=sys.stderr)
    dim, mb, n_micro = 1024, 4, 8
    for name, per_rank, cls in (("1f1b", 1, Schedule1F1B), ("interleaved_1f1b", 2, ScheduleInterleaved1F1B)):
        n_stages = world * per_rank
        stage_ids = [rank + k * world for k in range(per_rank)]
        torch.manual_seed(0)
        stages = []
        for s in stage_ids:
            module = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)).to(device)
            example = torch.empty(mb, dim, device=device, requires_grad=True)
            stages.append(PipelineStage(module, s, n_stages, device, input_args=example, output_args=example))
        schedule = cls(stages[0] if per_rank == 1 else stages, n_micro,
                       loss_fn=lambda out, target: ((out - target) ** 2).mean())
        x = torch.randn(n_micro * mb, dim, device=device)
        for step in range(3):
            t0 = time.perf_counter()
            losses = []
            last = n_stages - 1 in stage_ids
            schedule.step(*((x,) if 0 in stage_ids else ()), target=x if last else None,
                          losses=losses if last else None)
            if cuda:
                torch.cuda.synchronize()
            if last:
                print(f"[probe] {name} pp={world} step {step}: loss {torch.stack(losses).mean().item():.4f} "
                      f"{time.perf_counter() - t0:.3f}s", flush=True)
    dist.barrier()
    faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        print("[probe] all schedules finished", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
