"""Wanda scores (Sun et al. 2023): |W_ij| * ||X_j||_2, the weight magnitude times the L2 norm of
input feature j over every calibration token. The norms come from forward pre-hooks on the
layers to be pruned, over a few calibration batches of the dense model."""

from typing import Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn


def _default_forward(model: nn.Module, batch) -> None:
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    model(tokens)


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    layers: Dict[str, nn.Module],
    batches: Iterable,
    forward_fn: Optional[Callable[[nn.Module, object], None]] = None,
    group=None,
) -> Dict[str, torch.Tensor]:
    """||X_j||_2 per input feature (float32, shape (in_features,)) for each named layer.

    `batches`: token tensors (or (tokens, targets) tuples); `forward_fn(model, batch)` runs one
    forward if the default `model(tokens)` does not fit. Under torch.distributed the squared
    sums are all-reduced over `group` (default: the world; with tensor or pipeline parallel, the
    data-parallel group, whose ranks hold the same layers), so every rank derives the same masks
    from different batches."""
    forward_fn = forward_fn or _default_forward
    sumsq: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach()
            part = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
            sumsq[name] = part if name not in sumsq else sumsq[name] + part

        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    n_batches = 0
    try:
        for batch in batches:
            forward_fn(model, batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("collect_input_norms: batches is empty; Wanda needs at least one calibration batch")
    missing = sorted(set(layers) - set(sumsq))
    if missing:
        raise ValueError(f"collect_input_norms: calibration forward never reached layers {missing}")
    if dist.is_available() and dist.is_initialized():
        for name in sorted(sumsq):
            dist.all_reduce(sumsq[name], group=group)
    return {name: s.sqrt() for name, s in sumsq.items()}


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X|| broadcast over output rows (compared within each N:M group of a row)."""
    return weight.detach().abs().float() * input_norm.to(weight.device).float()[None, :]
