"""N:M sparse fine-tuning with SquareHead distillation (issue 6). See sparsify.py for the
trainer protocol; kernels live in sparsetron.kernels.nm_sparse."""

from sparsetron.configs.schema.sparsity import DEFAULT_LAYERS, DistillConfig, SparsityConfig

from .report import format_report, sparsity_report, verify_nm
from .sparsify import NMSparseLinear, Sparsifier, gradual_n, select_layers
from .squarehead import Distiller, SquareHeadLoss, make_teacher
from .wanda import collect_input_norms, wanda_scores

__all__ = [
    "DEFAULT_LAYERS",
    "DistillConfig",
    "Distiller",
    "NMSparseLinear",
    "Sparsifier",
    "SparsityConfig",
    "SquareHeadLoss",
    "collect_input_norms",
    "format_report",
    "gradual_n",
    "make_teacher",
    "select_layers",
    "sparsity_report",
    "verify_nm",
    "wanda_scores",
]
