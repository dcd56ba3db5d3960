"""The N:M fine-tuning recipe as the trainer runs it: a frozen dense teacher (copied before the
model goes sparse), the Sparsifier, and the SquareHead objective, attached to the engine's step.

Any engine (parallel/engine_protocol.Engine): the masks go on the layers this rank holds
(`engine.local_modules()`: TP shards, pipeline stages, or ZeRO-3's partitioned modules, whose full
weights `engine.full_params` gathers when masks are computed); the teacher is placed by
`engine.shard_frozen` the way the student is (TP-sharded, split into the same pipeline stages,
ZeRO-3-partitioned), never whole on every rank. Checkpoints hold the full masks (consolidated on
rank 0, `state_dict`, collective), so a run resumes or exports at any layout."""

import logging
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from sparsetron.parallel.reshard import split_dim

from .parallel_loss import TensorParallelLayout
from .report import check_mask, format_report, sparsity_report, verify_nm
from .sparsify import Sparsifier
from .squarehead import Distiller, make_teacher

log = logging.getLogger(__name__)


def as_dataclass(cfg):
    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg


class SparseFinetune:
    """Build it on the dense model before the engine (the teacher copy), then `attach(engine)`, then
    `init_masks(...)` (fresh start) or `load_state_dict(...)` (resume)."""

    def __init__(self, model: torch.nn.Module, sparsity_cfg, device: torch.device):
        self.cfg = as_dataclass(sparsity_cfg)
        self.model = model
        self.teacher = None  # the dense copy, where the model was built; the engine places it (attach)
        if self.cfg.distill.enabled:
            dtype = self.cfg.distill.teacher_dtype
            if dtype == "auto":  # bf16 teacher on GPU (no grad, half the memory); exact fp32 on CPU
                dtype = "bfloat16" if device.type == "cuda" else "float32"
            self.teacher = make_teacher(model, dtype)
        self.engine = None
        self.sparsifier: Optional[Sparsifier] = None
        self.distiller: Optional[Distiller] = None
        self.steps_done = 0
        self.last_metrics: Dict[str, float] = {}

    # ------------------------------------------------------------------------------ wiring
    def attach(self, engine) -> None:
        """Masks on this rank's layers, SR-STE and mask upkeep as step hooks, the teacher placed by the
        engine and SquareHead as the engine's objective."""
        self.engine = engine
        modules = engine.local_modules()
        self.model = modules[0] if len(modules) == 1 else modules
        self.sparsifier = Sparsifier(self.model, self.cfg, full_params=engine.full_params,
                                     norm_group=engine.g.dp_group)
        if not engine.grads_in_params:
            self.sparsifier.decay_in_backward(engine.micro_batches)
        engine.step_hooks.append(self)
        if self.teacher is not None:
            teacher, self.teacher = engine.shard_frozen(self.teacher), None  # drop the whole copy
            layout = TensorParallelLayout.of(engine.model)
            self.distiller = Distiller(teacher, self.cfg.distill, layout=layout)
            engine.objective = self.distiller

    def init_masks(self, calibration_batches: List[torch.Tensor]) -> None:
        batches = calibration_batches if self.cfg.method == "wanda" else None
        self.sparsifier.init_masks(batches, forward_fn=lambda _model, tokens: self.engine.forward_only(tokens))
        if self._whole_weights():
            log.info("one-shot %d:%d masks (%s)\n%s", self.cfg.n, self.cfg.m, self.cfg.method,
                     format_report(sparsity_report(self.model)))

    def _whole_weights(self) -> bool:
        """False under ZeRO-3 (partitioned parameters: a report would need every weight gathered)."""
        return not any(hasattr(layer.weight, "ds_id") for layer in self.sparsifier.layers.values())

    # ------------------------------------------------------------------------- step hooks
    def before_optimizer_step(self) -> None:
        self.sparsifier.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.steps_done += 1
        self.sparsifier.after_optimizer_step(self.steps_done)
        if self.distiller is not None:
            self.last_metrics = self._distill_metrics()

    def _distill_metrics(self) -> Dict[str, float]:
        """kl and squarehead, the mean over the step's micro-batches on every data-parallel rank (as the
        logged loss is), whatever the layout: pipeline stages each hold their blocks' part."""
        d, g = self.distiller, self.engine.g
        device = next(iter(self.sparsifier.layers.values())).weight.device
        sums = torch.stack([d.sums.get(k, torch.zeros((), device=device)).float().reshape(()).to(device)
                            for k in ("kl", "squarehead")])
        d.sums = {}
        if g.pp > 1:
            dist.all_reduce(sums, group=g.pp_group)
        if g.dp > 1:
            dist.all_reduce(sums, group=g.dp_group)
        kl, sq = (sums / (self.engine.micro_batches * g.dp)).tolist()
        return {"kl": kl, "squarehead": sq}

    # ---------------------------------------------------------------------- checkpoints
    def verify(self) -> int:
        """Collective: every rank checks the masks of the layers it holds keep exactly n of m (raises
        the same ValueError on every rank if one does not). Returns this rank's layer count."""
        error = None
        try:
            for name, layer in self.sparsifier.layers.items():
                check_mask(name, layer.weight_mask, self.sparsifier.n, self.cfg.m)
            if self._whole_weights():
                verify_nm(self.model, self.sparsifier.n, self.cfg.m)  # the effective weights too, where whole
        except ValueError as err:
            error = str(err)
        if self._distributed():
            errors: List[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
        if error:
            raise ValueError(error)
        return len(self.sparsifier.layers)

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def state_dict(self) -> Optional[dict]:
        """Collective. Verifies the masks, then the full state (masks of the whole model, as one process
        holds them) on rank 0; None on the other ranks when shards had to be gathered."""
        self.verify()
        local = self.sparsifier.state_dict()
        g = self.engine.g if self.engine is not None else None
        if g is None or not self._distributed() or g.tp == g.pp == 1:  # DDP / ZeRO: masks are whole on every rank
            return {"sparsifier": local, "steps_done": self.steps_done}
        mine = (g.tp_rank, local) if g.dp_rank == 0 and g.cp_rank == 0 else None
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        return {"sparsifier": _join(local, [p for p in parts if p is not None], g.tp), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        """The full state of any layout's checkpoint; this rank takes its layers' slices."""
        full = state["sparsifier"]
        g = self.engine.g if self.engine is not None else None
        mine = set(self.sparsifier.layers)
        tp, tp_rank = (g.tp, g.tp_rank) if g is not None else (1, 0)
        local = {**full,
                 "masks": {k: _tp_part(k, v, tp, tp_rank, 0) for k, v in full["masks"].items() if k in mine},
                 "input_norms": {k: _tp_part(k, v, tp, tp_rank, 1) for k, v in full["input_norms"].items() if k in mine}}
        self.sparsifier.load_state_dict(local)
        self.steps_done = state["steps_done"]


def _tp_part(layer: str, full: torch.Tensor, tp: int, tp_rank: int, norm_dim: int) -> torch.Tensor:
    """This tp rank's slice of a layer's full mask (norm_dim 0) or input norms (norm_dim 1: only
    row-parallel layers split their inputs)."""
    dim = split_dim(f"{layer}.weight")
    if tp == 1 or dim is None or (norm_dim == 1 and dim != 1):
        return full
    along = 0 if norm_dim == 1 else dim
    per = full.shape[along] // tp
    return full.narrow(along, tp_rank * per, per).clone()


def _join(template: dict, parts: list, tp: int) -> dict:
    """The full sparsifier state from each (tp rank, local state) of the writers (dp rank 0)."""
    masks: Dict[str, List] = {}
    norms: Dict[str, List] = {}
    for _tp_rank, local in sorted(parts, key=lambda p: p[0]):
        for name, mask in local["masks"].items():
            masks.setdefault(name, []).append(mask)
        for name, norm in local["input_norms"].items():
            norms.setdefault(name, []).append(norm)

    def cat(name: str, shards: list, norm: bool) -> torch.Tensor:
        dim = split_dim(f"{name}.weight")
        if len(shards) == 1 or dim is None or (norm and dim != 1):
            return shards[0]
        return torch.cat(shards, dim=0 if norm else dim)

    return {**template, "masks": {k: cat(k, v, False) for k, v in masks.items()},
            "input_norms": {k: cat(k, v, True) for k, v in norms.items()}}


def apply_saved_masks(model: torch.nn.Module, sparsity_cfg, state: dict) -> Sparsifier:
    """Make a freshly loaded model sparse again from a checkpoint's sparsity state, check the
    pattern, and bake the masks into plain weights (for export). Returns the spent Sparsifier."""
    sparsifier = Sparsifier(model, as_dataclass(sparsity_cfg))
    sparsifier.load_state_dict(state["sparsifier"])
    verify_nm(model, sparsifier.n, sparsifier.cfg.m)
    sparsifier.finalize()
    return sparsifier
