"""How the job is spread over ranks (configs/parallel/*.yaml). The legality of a combination is
checked by sparsetron.parallel.legality before any process group exists (README: "Parallel layouts")."""

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class AioConfig:
    """DeepSpeed async I/O for NVMe offload (ZeRO-Infinity); DeepSpeed's own defaults."""

    block_size: int = 1048576
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (Megatron column/row split of attention, MLP, embedding, head)
    pp: int = 1  # pipeline parallel stages (ranks)
    cp: int = 1  # context parallel: each sequence split over cp ranks (parallel/context_parallel.py)
    ep: int = 1  # expert parallel (MoE experts sharded over ep ranks, carved out of dp)
    dp: int = -1  # -1: whatever the world size leaves after tp * pp * cp
    sequence_parallel: bool = False  # with tp > 1: norms/residuals sharded along the sequence
    # Pipeline: schedule, model chunks per pp rank, and optional explicit layers per stage
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zero_bubble | zbv
    pp_virtual_stages: int = 1  # model chunks per pp rank (interleaved_1f1b, zero_bubble; zbv needs 2)
    pp_layers: List[int] = field(default_factory=list)  # layers per stage (pp * virtual entries); [] = even
    # Data parallel / ZeRO
    engine: str = "auto"  # auto | native (DDP, TP/PP, ZeRO-1 via torch) | deepspeed (ZeRO 0-3, offload)
    zero_stage: int = 0
    offload_optimizer: str = "none"  # none | cpu | nvme   (DeepSpeed)
    offload_param: str = "none"  # none | cpu | nvme       (DeepSpeed, ZeRO-3 only)
    nvme_path: str = "/tmp/sparsetron_nvme"
    pin_memory: bool = True  # pinned host buffers for offload (GPU only; off when host states > 75% of free RAM)
    aio: AioConfig = field(default_factory=AioConfig)
    deepspeed_overrides: Dict[str, Any] = field(default_factory=dict)  # deep-merged into the generated JSON
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
