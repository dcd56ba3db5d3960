"""Structured configs: the typed schema that every YAML in configs/ is merged into, so a typo or a
wrong type fails at composition time with the field's name."""

from dataclasses import dataclass, field

from .attention import AttentionConfig
from .checkpoint import CheckpointConfig
from .data import DataConfig
from .logging import LoggingConfig, WandbConfig
from .model import ModelConfig
from .moe import MoEConfig
from .optim import OptimConfig
from .parallel import ParallelConfig
from .sparsity import DistillConfig, SparsityConfig
from .train import TrainConfig


@dataclass
class Config:
    name: str = "default"  # run name: the run directory is runs/<name> unless run_dir is set
    run_dir: str = "${hydra:runtime.output_dir}"
    resume: str = "none"  # none | auto (newest checkpoint in the run dir that verifies) | a checkpoint path
    overwrite: bool = False  # a new run (resume=none) may replace an old one in the run dir: it is moved aside, never deleted
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sparsity: SparsityConfig = field(default_factory=lambda: SparsityConfig(enabled=False))
    train: TrainConfig = field(default_factory=TrainConfig)


SCHEMA_NAME = "sparsetron_schema"


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


__all__ = [
    "AttentionConfig", "CheckpointConfig", "Config", "DataConfig", "DistillConfig", "SparsityConfig", "LoggingConfig", "ModelConfig",
    "MoEConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "WandbConfig", "register", "SCHEMA_NAME",
]
