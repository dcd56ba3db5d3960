"""How the job is spread over ranks (configs/parallel/*.yaml)."""

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = -1  # -1: whatever the world size leaves after tp * pp * cp
    zero_stage: int = 0
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
