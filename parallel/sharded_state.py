"""Checkpoint writing/reading shared by the native engines (DDP, TP/PP/ZeRO-1): every rank with
dp_rank 0 writes its (tp, pp) shard of the weights and the name-keyed AdamW state, rank 0 writes
layout.json; loading at another layout goes through the full (consolidated) tensors."""

from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import reshard as rs


class ShardedStateMixin:
    """Needs: self.g (ParallelGroups), self.rt (Runtime), self.optimizer, self.layout_info(),
    self.local_modules() (modules whose state_dict this rank owns), self.param_names
    (id(param) -> checkpoint name) and self.tied_copy (the last stage's own head.weight, or None)."""

    tied_copy: Optional[torch.nn.Parameter] = None

    # -- what this rank owns
    def local_state(self) -> Dict[str, torch.Tensor]:
        from sparsetron.train.checkpoint import unique_tensors

        return unique_tensors({k: v.detach() for k, v in self._live_tensors().items()})

    def _live_tensors(self) -> Dict[str, torch.Tensor]:
        """Name -> the live parameter/buffer (for in-place loading)."""
        out: Dict[str, torch.Tensor] = {}
        seen = set() if self.tied_copy is None else {id(self.tied_copy)}
        for module in self.local_modules():
            for name, t in module.state_dict(keep_vars=True).items():
                if id(t) not in seen:  # a tied weight once, under its first name (embed.weight)
                    seen.add(id(t))
                    out.setdefault(name, t)
        return out

    def _optimizer_state_for_save(self) -> Optional[dict]:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)  # collective over the dp group
            if self.g.dp_rank != 0:
                return None
        named = rs.named_optimizer_state(self.optimizer, self.param_names)
        keep = set(self.local_state())
        named["state"] = {k: v for k, v in named["state"].items() if k in keep}
        return named

    def _writes(self) -> bool:
        """One writer per distinct shard: dp rank 0 (and, under EP, the first replica of each expert shard)."""
        return self.g.dp_rank < self.g.ep and self.g.cp_rank == 0

    # -- save
    def save_checkpoint(self, directory: str) -> None:
        """Collective: every rank calls it with the same (existing, shared) directory."""
        from sparsetron.train.checkpoint import write_files

        g = self.g
        named_opt = self._optimizer_state_for_save()
        if self._writes():
            write_files(directory, {
                rs.model_file(g.tp_rank, g.pp_rank, g.tp, g.pp, g.ep_rank, g.ep): self.local_state(),
                rs.optimizer_file(g.tp_rank, g.pp_rank, g.tp, g.pp, g.ep_rank, g.ep): named_opt,
            })
        if self.rt.is_main:
            write_files(directory, {rs.LAYOUT: {**self.layout_info(), "optimizer": "native"}})

    # -- load
    def _same_layout(self, saved: dict) -> bool:
        mine = self.layout_info()
        return all(saved.get(k, 1 if k == "ep" else None) == mine.get(k) for k in ("tp", "pp", "ep", "stages"))

    def load_checkpoint(self, path: str) -> None:
        from sparsetron.train import checkpoint as ckpt

        g = self.g
        saved = rs.read_layout(path)
        same = self._same_layout(saved)
        live = self._live_tensors()
        if same:
            weights = ckpt.read_tensors(path, rs.model_file(g.tp_rank, g.pp_rank, g.tp, g.pp, g.ep_rank, g.ep))
        else:
            full = rs.consolidated_weights(path)
            weights = {n: rs.ep_slice(n, rs.tp_slice(n, full[n], g.tp, g.tp_rank), g.ep, g.ep_rank)
                       for n in live if n in full}
        if self.tied_copy is not None:  # the last stage's copy of the tied embedding
            src = weights if "embed.weight" in weights else (
                ckpt.read_tensors(path, rs.model_file(g.tp_rank, 0, g.tp, g.pp)) if same else
                {"embed.weight": rs.tp_slice("embed.weight", full["embed.weight"], g.tp, g.tp_rank)})
            weights = {**weights, "__tied__": src["embed.weight"]}
        missing = [n for n in live if n not in weights]
        unexpected = [n for n in weights if n not in live and n != "__tied__"]
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{path}: weights do not fit this model/layout (missing {missing[:5]}, "
                                       f"unexpected {unexpected[:5]}; saved layout {saved})")
        with torch.no_grad():
            for name, t in live.items():
                if t.shape != weights[name].shape:
                    raise ckpt.CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, this "
                                               f"rank expects {tuple(t.shape)} (saved layout {saved})")
                t.copy_(weights[name])
            if self.tied_copy is not None:
                self.tied_copy.copy_(weights["__tied__"])
        self._load_optimizer(path, saved, same)

    def _load_optimizer(self, path: str, saved: dict, same: bool) -> None:
        from sparsetron.train import checkpoint as ckpt

        g = self.g
        kind = saved.get("optimizer", "native")
        if kind is None:  # weights-only (converted from a DeepSpeed checkpoint): fresh AdamW moments
            if self.rt.is_main:
                print(f"sparsetron: {path} holds weights only; the optimizer starts fresh", flush=True)
            return
        if kind != "native":
            raise ckpt.CheckpointError(
                f"{path}: optimizer state was saved by engine={saved.get('engine')} (tp={saved.get('tp')}, "
                f"dp={saved.get('dp')}, zero_stage={saved.get('zero_stage')}); this run uses the native engine. "
                f"Resume with the saved layout, or convert it to weights only first (fresh AdamW moments): "
                f"python -m sparsetron.parallel.reshard {path} NEW_CKPT --weights-only")
        if same:
            named = ckpt.read_torch(path, rs.optimizer_file(g.tp_rank, g.pp_rank, g.tp, g.pp, g.ep_rank, g.ep))
            if self.tied_copy is not None:
                first = ckpt.read_torch(path, rs.optimizer_file(g.tp_rank, 0, g.tp, g.pp))
                named["state"].setdefault("embed.weight", first["state"].get("embed.weight"))
        else:
            named = rs.consolidated_optimizer(path)
        local = {**{n: t for n, t in self._live_tensors().items()}}
        if self.tied_copy is not None:
            local["embed.weight"] = self.tied_copy
        named["state"] = {k: v for k, v in named["state"].items() if v is not None}
        try:
            state = rs.positional_optimizer_state(self.optimizer, named, self.param_names, local, g.tp, g.tp_rank,
                                                  g.ep, g.ep_rank)
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"{path}: optimizer state does not fit this optimizer ({err})") from None

    # -- tests / tools: the full model on rank 0
    def consolidated_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Collective. The full model's weights (as one process would hold them) on rank 0, else None."""
        g = self.g
        mine = self.local_state() if self._writes() else None
        if not self.rt.distributed:
            return mine
        parts = [None] * self.rt.world_size if self.rt.is_main else None
        dist.gather_object(((g.tp_rank, g.pp_rank, g.ep_rank), mine), parts, dst=0)
        if not self.rt.is_main:
            return None
        shards = {key: state for key, state in parts if state is not None}
        return rs._join_shards(shards, g.tp, g.pp, g.ep)
