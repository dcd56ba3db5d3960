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
    log_every: int = 1
    progress_bar: bool = True
    plot: bool = True  # loss-curve PNG in the run directory at the end
    wandb: WandbConfig = field(default_factory=WandbConfig)
