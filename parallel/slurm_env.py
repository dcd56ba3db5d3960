"""torch.distributed environment from Slurm variables, for launches without torchrun.

launch/slurm.sbatch runs torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR.
The Hydra submitit launcher (sweeps) and plain ``srun --ntasks-per-node=8 python -m
sparsetron.train`` start one process per GPU directly; ``apply_slurm_env()`` fills the same
variables from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST.
Call it before ``init_process_group``; it changes nothing when RANK is already set.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping, Optional

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a Slurm hostlist ("node[01-03,07]", "a,b", "r[1-2]-n[08-09]"), in order.

    Same rules as expand_nodelist in launch/lib.sh (tests check they agree)."""
    if not nodelist:
        raise ValueError("nodelist must not be empty")
    items, depth, cur = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"nodelist {nodelist!r} has unbalanced brackets")
    items.append(cur)
    hosts: list[str] = []
    for item in filter(None, items):
        hosts.extend(_expand_item(item, nodelist))
    return hosts


def _expand_item(expr: str, whole: str) -> list[str]:
    if "[" not in expr:
        return [expr]
    prefix, rest = expr.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    out = []
    for part in ranges.split(","):
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"nodelist {whole!r}: bad range {part!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_item(f"{prefix}{n:0{len(lo)}d}{suffix}", whole))
    return out


def apply_slurm_env(env: Optional[MutableMapping[str, str]] = None, default_port: int = 29500) -> bool:
    """Set torch.distributed variables from Slurm's; returns True if it set them."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return False
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = str(ntasks // max(1, nnodes))
    env.setdefault("MASTER_ADDR", expand_nodelist(env["SLURM_JOB_NODELIST"])[0])
    job = int(env.get("SLURM_JOB_ID", "0"))
    env.setdefault("MASTER_PORT", str(20000 + job % 20000 if job else default_port))  # as slurm.sbatch
    return True
