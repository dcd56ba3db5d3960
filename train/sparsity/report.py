"""Export checks: verify the N:M pattern of every sparse layer, and a per-layer sparsity report."""

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .sparsify import NMMasked, named_modules, select_layers


def _effective(module: nn.Module) -> torch.Tensor:
    return module.effective_weight() if isinstance(module, NMMasked) else module.weight.detach()


@torch.no_grad()
def verify_nm(model: nn.Module, n: int, m: int, layers: Optional[Iterable[str]] = None) -> int:
    """Raise ValueError naming the first layer whose weight has more than n nonzeros in some
    group of m consecutive inputs (or whose mask does not keep exactly n). Checks every
    N:M layer (NMSparseLinear or a sparse tensor-parallel shard), plus the nn.Linear layers matching
    `layers` patterns (after finalize()). `model`: a module or a list of them (pipeline stages).
    Returns the number of layers checked."""
    targets = {name: mod for name, mod in named_modules(model).items() if isinstance(mod, NMMasked)}
    if layers is not None:
        targets.update(select_layers(model, list(layers)))
    if not targets:
        raise ValueError("verify_nm: the model has no N:M sparse layer to check")
    for name, mod in sorted(targets.items()):
        w = _effective(mod)
        if w.shape[-1] % m:
            raise ValueError(f"verify_nm: layer {name} has in_features={w.shape[-1]}, not divisible by m={m}")
        nonzeros = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        bad = (nonzeros > n).nonzero()
        if len(bad):
            row, group = bad[0].tolist()
            raise ValueError(
                f"verify_nm: layer {name} violates {n}:{m}: row {row}, inputs {group * m}..{group * m + m - 1} "
                f"have {nonzeros[row, group].item()} nonzeros ({len(bad)} bad groups in this layer)"
            )
        if isinstance(mod, NMMasked):
            check_mask(name, mod.weight_mask, n, m)
    return len(targets)


def check_mask(name: str, mask: torch.Tensor, n: int, m: int) -> None:
    """ValueError unless bool `mask` keeps exactly n of every m consecutive inputs."""
    if mask.shape[-1] % m:
        raise ValueError(f"verify_nm: layer {name} mask has {mask.shape[-1]} inputs, not divisible by m={m}")
    kept = mask.reshape(-1, m).sum(-1)
    if not (kept == n).all():
        raise ValueError(f"verify_nm: layer {name} mask keeps {sorted(set(kept.tolist()))} of {m}, expected exactly {n}")


@torch.no_grad()
def sparsity_report(model: nn.Module) -> Dict[str, dict]:
    """Per weight-bearing layer (linear and embedding): shape, zeros, sparsity, N:M pattern."""
    report: Dict[str, dict] = {}
    seen = {}
    for name, mod in named_modules(model).items():
        if not isinstance(mod, (nn.Linear, nn.Embedding, NMMasked)):
            continue
        w = _effective(mod)
        zeros = int((w == 0).sum())
        report[name] = {
            "type": "nm_sparse" if isinstance(mod, NMMasked) else type(mod).__name__,
            "shape": tuple(w.shape),
            "numel": w.numel(),
            "zeros": zeros,
            "sparsity": zeros / max(w.numel(), 1),
            "pattern": f"{mod.n}:{mod.m}" if isinstance(mod, NMMasked) else "dense",
            "tied_to": seen.get(id(mod.weight)),
        }
        seen.setdefault(id(mod.weight), name)
    return report


def format_report(report: Dict[str, dict]) -> str:
    """Fixed-width table; tied weights are counted once in the total."""
    width = max([len("layer")] + [len(k) for k in report])
    lines = [f"{'layer':<{width}}  {'type':<10} {'shape':>14} {'pattern':>7} {'sparsity':>8}"]
    lines.append("-" * len(lines[0]))
    total = zeros = 0
    for name, r in report.items():
        shape = "x".join(str(s) for s in r["shape"])
        note = f"  (tied to {r['tied_to']})" if r["tied_to"] else ""
        lines.append(f"{name:<{width}}  {r['type']:<10} {shape:>14} {r['pattern']:>7} {r['sparsity']:>8.2%}{note}")
        if not r["tied_to"]:
            total += r["numel"]
            zeros += r["zeros"]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'total':<{width}}  {'':<10} {total:>14} {'':>7} {zeros / max(total, 1):>8.2%}")
    return "\n".join(lines)
