"""Process groups, built once from parallel.{tp,cp,ep,dp,pp} and the world size.

Rank layout (Megatron-core parallel_state's default order "tp-cp-ep-dp-pp"): TP is innermost
(neighbouring ranks, same node), then CP, then DP, and PP outermost:

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

Expert parallel is carved out of DP (as Megatron does for the expert layout): the ep ranks of a
group are `ep` consecutive dp ranks; `expert_dp_group` joins the dp ranks that hold the same
experts (where expert gradients are averaged). `embed_group` joins the first and last pipeline
stage of each (tp, cp, dp) coordinate (tied embeddings are synchronised there). `dp_cp_group`
joins the dp x cp ranks of one (tp, pp) coordinate, which hold the same parameters and average
their gradients there under context parallel (Megatron's data-parallel-with-cp group); with
cp = 1 it is the dp group itself.

Every rank calls `dist.new_group` for every group in the same order (a collective requirement);
groups of size 1 are kept as `None` only in the single-process case."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from .runtime import Runtime


@dataclass
class ParallelGroups:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    ep_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    cp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    expert_dp_group: Optional[dist.ProcessGroup] = None
    embed_group: Optional[dist.ProcessGroup] = None
    dp_cp_group: Optional[dist.ProcessGroup] = None
    pp_ranks: List[int] = field(default_factory=lambda: [0])  # global ranks of this rank's pipeline, by stage
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def coords(self) -> Dict[str, int]:
        return {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp_rank, "cp": self.cp_rank, "ep": self.ep_rank}

    def as_deepspeed_mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


def rank_of(tp_r: int, cp_r: int, dp_r: int, pp_r: int, tp: int, cp: int, dp: int) -> int:
    return ((pp_r * dp + dp_r) * cp + cp_r) * tp + tp_r


def layout_ranks(tp: int, cp: int, dp: int, pp: int, ep: int = 1) -> Dict[str, List[List[int]]]:
    """All groups of each kind as lists of global ranks (pure: testable without processes)."""
    r = lambda t, c, d, p: rank_of(t, c, d, p, tp, cp, dp)  # noqa: E731
    out: Dict[str, List[List[int]]] = {"tp": [], "cp": [], "dp": [], "pp": [], "ep": [], "expert_dp": [], "embed": [],
                                       "dp_cp": []}
    for p in range(pp):
        for t in range(tp):
            out["dp_cp"].append([r(t, c, d, p) for d in range(dp) for c in range(cp)])
        for d in range(dp):
            for c in range(cp):
                out["tp"].append([r(t, c, d, p) for t in range(tp)])
            for t in range(tp):
                out["cp"].append([r(t, c, d, p) for c in range(cp)])
        for c in range(cp):
            for t in range(tp):
                out["dp"].append([r(t, c, d, p) for d in range(dp)])
                for e0 in range(0, dp, ep):
                    out["ep"].append([r(t, c, d, p) for d in range(e0, e0 + ep)])
                for e in range(ep):
                    out["expert_dp"].append([r(t, c, d, p) for d in range(e, dp, ep)])
    for d in range(dp):
        for c in range(cp):
            for t in range(tp):
                out["pp"].append([r(t, c, d, p) for p in range(pp)])
                out["embed"].append(sorted({r(t, c, d, 0), r(t, c, d, pp - 1)}))
    return out


def build_groups(pcfg, runtime: Runtime) -> ParallelGroups:
    """The groups of this rank for layout `pcfg` (legality is checked before, in validate)."""
    from .legality import data_parallel_size

    world, rank = runtime.world_size, runtime.rank
    tp, pp, cp, ep = pcfg.tp, pcfg.pp, pcfg.cp, pcfg.ep
    dp = data_parallel_size(pcfg, world)
    if tp * pp * cp * dp != world:
        raise ValueError(f"parallel: tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} must equal the world size {world}")
    tp_r, rest = rank % tp, rank // tp
    cp_r, rest = rest % cp, rest // cp
    dp_r, pp_r = rest % dp, rest // dp
    g = ParallelGroups(tp, pp, dp, cp, ep, rank, tp_r, pp_r, dp_r, cp_r, dp_r % ep)
    if world == 1:
        return g
    backend = runtime.backend
    for kind, lists in layout_ranks(tp, cp, dp, pp, ep).items():
        for ranks in lists:
            if (kind == "embed" and pp == 1) or (kind == "dp_cp" and cp == 1):
                continue
            group = dist.new_group(ranks, backend=backend)
            if rank in ranks:
                setattr(g, f"{kind}_group", group)
                if kind in ("pp", "tp", "dp"):
                    setattr(g, f"{kind}_ranks", list(ranks))
    if cp == 1:
        g.dp_cp_group = g.dp_group
    return g


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed reads (Megatron's names): data-parallel group for ZeRO, tensor
    (model) parallel group for the global grad norm and checkpoint names."""

    def __init__(self, g: ParallelGroups):
        self.g = g

    def get_data_parallel_group(self):
        return self.g.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.g.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.g.dp

    def get_model_parallel_group(self):
        return self.g.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.g.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.g.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_group(self):
        return self.g.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.g.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.g.pp

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_data_parallel_group(self):
        return self.g.dp_group
