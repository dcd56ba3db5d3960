"""N:M sparse fine-tuning + SquareHead distillation options (configs/sparsity/*.yaml); the
dataclasses live with the code that reads them (train/sparsity/config.py)."""

from sparsetron.train.sparsity.config import DistillConfig, SparsityConfig

__all__ = ["DistillConfig", "SparsityConfig"]
