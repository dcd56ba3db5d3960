from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between saves (0: only at the end)
    keep_last: int = 2  # older complete checkpoints are deleted after a new one lands
    save_final: bool = True
    dir: str = "checkpoints"  # relative to the run directory unless absolute
