from dataclasses import dataclass, field
from typing import Optional


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "sparsetron"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    log_every: int = 1  # steps between metrics.jsonl / wandb / TensorBoard records and plain log lines
    progress_bar: bool = True  # tqdm bar when stderr is a terminal; else (SLURM, pipes) one plain line per record
    plot: bool = True  # loss-curve PNG in the run directory at the end
    tensorboard: bool = False  # also write <run dir>/tensorboard event files (pip install tensorboard)
    # MFU denominator per GPU in dense bf16 TFLOP/s; null = the datasheet table (train/metrics.py PEAK_BF16)
    # for known GPUs, no MFU elsewhere (CPU, unknown GPUs)
    peak_tflops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
