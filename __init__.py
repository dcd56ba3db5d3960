"""sparsetron: distributed and sparse LLM training on top of PyTorch.

The repository root is this package; importing it stays light (no torch / hydra import)
so that `python -m sparsetron.train` and the kernels load only what they need.
"""

__version__ = "0.1.0"
