"""Weak / strong scaling PNGs from the tables of scaling_math.py (matplotlib, Agg: no display).

Re-draw from a finished report (run.py writes the PNGs itself):
    python benchmarks/scaling/plots.py benchmarks/results/scaling_cpu.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List


def _axes(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(title, fontsize=10)
    return plt, fig, left, right


def _workers_axis(ax, worlds: List[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(worlds)
    ax.set_xticklabels([str(w) for w in worlds])
    ax.set_xlabel("workers (ranks / GPUs)")
    ax.grid(True, alpha=0.3)


def plot_strong(table: Dict[str, List[dict]], path: str, title: str) -> None:
    """Left: tokens/s vs workers (dashed: ideal from each curve's base). Right: efficiency."""
    plt, fig, left, right = _axes(f"Strong scaling (fixed global batch) - {title}")
    worlds = sorted({r["world"] for rows in table.values() for r in rows})
    ideal_drawn = set()
    for curve, rows in sorted(table.items()):
        x = [r["world"] for r in rows]
        line, = left.plot(x, [r["tokens_per_s"] for r in rows], "o-", label=curve)
        base = rows[0]
        key = (base["world"], base["tokens_per_s"])
        if key not in ideal_drawn:  # curves that share a base run share one ideal line
            ideal = [w for w in worlds if w >= base["world"]]
            left.plot(ideal, [base["tokens_per_s"] * w / base["world"] for w in ideal], "--", color="gray",
                      alpha=0.6, label="ideal" if not ideal_drawn else None)
            ideal_drawn.add(key)
        right.plot(x, [r["efficiency"] for r in rows], "o-", label=curve, color=line.get_color())
    _finish(plt, fig, left, right, table, worlds, path, "tokens/s (all workers)",
            "efficiency = speedup / (workers / base workers)")


def _finish(plt, fig, left, right, table, worlds, path: str, left_label: str, right_label: str) -> None:
    """Shared axes, limits and legends of both scaling figures, then save."""
    left.set_ylabel(left_label)
    left.set_ylim(bottom=0)
    right.set_ylim(0, max(1.1, max(r["efficiency"] for rows in table.values() for r in rows) + 0.05))
    right.set_ylabel(right_label)
    right.axhline(1.0, color="gray", lw=0.8)
    for ax in (left, right):
        _workers_axis(ax, worlds or [1])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weak(table: Dict[str, List[dict]], path: str, title: str) -> None:
    """Left: tokens/s per worker vs workers. Right: efficiency (per-worker throughput / base's)."""
    plt, fig, left, right = _axes(f"Weak scaling (fixed batch per worker) - {title}")
    worlds = sorted({r["world"] for rows in table.values() for r in rows})
    for curve, rows in sorted(table.items()):
        x = [r["world"] for r in rows]
        line, = left.plot(x, [r["tokens_per_s_per_worker"] for r in rows], "o-", label=curve)
        right.plot(x, [r["efficiency"] for r in rows], "o-", label=curve, color=line.get_color())
    _finish(plt, fig, left, right, table, worlds, path, "tokens/s per worker",
            "efficiency = per-worker tokens/s / base's")


def plot_report(report_path: str) -> List[str]:
    """Both PNGs of a run.py JSON report, at the paths it records (relative to the repository)."""
    with open(report_path) as f:
        report = json.load(f)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    title = f"{report['matrix']} ({report['environment']['device']['kind']})"
    written = []
    for kind, draw in (("strong", plot_strong), ("weak", plot_weak)):
        if report["scaling"][kind]:
            path = os.path.join(repo, report["plots"][kind])
            draw(report["scaling"][kind], path, title)
            written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/scaling/plots.py REPORT.json")
    for path in plot_report(sys.argv[1]):
        print(f"wrote {path}")
