"""Weak and strong scaling tables from measured runs (pure arithmetic; tests use hand numbers).

A run is a dict with "name", "world" (workers = processes = GPUs), "tokens_per_s", and the curves
it belongs to: "strong" / "weak", tuples of curve names. A curve's base is its run with the
fewest workers.

- Strong scaling (fixed global batch): speedup(n) = T(n) / T(base);
  efficiency(n) = speedup(n) / (n / n_base). 1.0 = perfect.
- Weak scaling (fixed batch per worker, so the global batch grows with n):
  per-worker throughput T(n)/n; efficiency(n) = (T(n)/n) / (T(base)/n_base).
"""

from __future__ import annotations

from typing import Dict, List, Sequence


def _curves(runs: Sequence[dict], kind: str) -> Dict[str, List[dict]]:
    if kind not in ("strong", "weak"):
        raise ValueError(f"kind must be 'strong' or 'weak', got {kind!r}")
    out: Dict[str, List[dict]] = {}
    for run in runs:
        if run.get("tokens_per_s") is None:  # failed run: no point on the curve
            continue
        for curve in run.get(kind, ()):
            out.setdefault(curve, []).append(run)
    for curve, members in out.items():
        members.sort(key=lambda r: r["world"])
        worlds = [r["world"] for r in members]
        if len(set(worlds)) != len(worlds):
            raise ValueError(f"{kind} curve {curve!r} has two runs with the same world size: "
                             f"{[r['name'] for r in members]}")
    return out


def strong_scaling(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    """{curve: [{name, world, tokens_per_s, speedup, efficiency}, ...]} ordered by world size."""
    table = {}
    for curve, members in _curves(runs, "strong").items():
        base = members[0]
        rows = []
        for r in members:
            speedup = r["tokens_per_s"] / base["tokens_per_s"]
            rows.append({"name": r["name"], "world": r["world"], "tokens_per_s": r["tokens_per_s"],
                         "speedup": speedup, "efficiency": speedup / (r["world"] / base["world"])})
        table[curve] = rows
    return table


def weak_scaling(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    """{curve: [{name, world, tokens_per_s, tokens_per_s_per_worker, efficiency}, ...]}."""
    table = {}
    for curve, members in _curves(runs, "weak").items():
        base = members[0]["tokens_per_s"] / members[0]["world"]
        rows = []
        for r in members:
            per_worker = r["tokens_per_s"] / r["world"]
            rows.append({"name": r["name"], "world": r["world"], "tokens_per_s": r["tokens_per_s"],
                         "tokens_per_s_per_worker": per_worker, "efficiency": per_worker / base})
        table[curve] = rows
    return table
