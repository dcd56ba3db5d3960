"""Make a model's linear layers N:M sparse from the outside, and keep them N:M while training.

How: each selected `nn.Linear` is swapped for `NMSparseLinear`, a subclass that takes over the
very same `weight`/`bias` Parameter objects and adds a non-persistent bool `weight_mask`
buffer; its forward runs `nm_linear` (masked weight, 2:4 packed matmul on GPU where allowed).

Why not torch.nn.utils.parametrize: it renames the weight to
`...q_proj.parametrizations.weight.original`, so checkpoints and the HF export would need key
translation, and it only yields a masked dense weight: running the packed 2:4 matmul would
still need a module of our own.
Why not a forward pre-hook: a hook cannot change which tensor F.linear reads without
temporarily replacing the registered Parameter each call, which breaks under activation
checkpoint recompute and FSDP. The subclass keeps `isinstance(m, nn.Linear)`, the parameter
names, and the Parameter objects (an optimizer built before or after stays valid), and
`model.state_dict()` has exactly the dense model's keys (masks travel in `Sparsifier.state_dict`).

Trainer protocol (`step` = optimizer steps done, 1 after the first):
    teacher = make_teacher(model, cfg.distill.teacher_dtype)   # dense copy, BEFORE sparsifying
    sparsifier = Sparsifier(model, cfg)                  # after loading dense weights, before DDP wrap
    sparsifier.init_masks(calibration_batches)           # fresh start (batches only for wanda);
                                                         # on resume: sparsifier.load_state_dict(ckpt)
    distiller = Distiller(teacher, cfg.distill)
    each step: out = distiller(model, tokens, targets); out["loss"].backward()   (per micro-batch)
               scaler.unscale_(opt) if any
               sparsifier.before_optimizer_step()        # SR-STE decay into .grad (before clipping)
               clip_grad_norm_; optimizer.step()
               sparsifier.after_optimizer_step(step)     # re-zero (fixed) / recompute masks (SR-STE, ramp)
    checkpoint: model.state_dict() (dense names) + sparsifier.state_dict() (masks, n, Wanda norms)
    export:     verify_nm(model, cfg.n, cfg.m); sparsifier.export_state_dict() or sparsifier.finalize()
"""

import fnmatch
import logging
import math
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from sparsetron.configs.schema.sparsity import SparsityConfig
from sparsetron.kernels.nm_sparse import nm_linear, nm_mask, semi_structured_unavailable
from sparsetron.kernels.nm_sparse.semi_structured import compute_dtype, pack_2to4

from .wanda import collect_input_norms, wanda_scores

logger = logging.getLogger(__name__)


class NMSparseLinear(nn.Linear):
    """nn.Linear whose forward uses weight * weight_mask (N:M along in_features)."""

    def __init__(self, in_features, out_features, bias=True, *, n=2, m=4, mode="srste", backend="auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.n, self.m, self.mode, self.backend = n, m, mode, backend
        self.register_buffer("weight_mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device), persistent=False)
        self._packed = None  # (key, packed 2:4 weight) for no-grad forwards

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "NMSparseLinear":
        with torch.device("meta"):  # no throwaway allocation: the Parameters are taken over below
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        new.weight_mask = torch.ones(linear.weight.shape, dtype=torch.bool, device=linear.weight.device)
        new.train(linear.training)
        return new

    def effective_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.weight_mask

    def _cached_packing(self, x: torch.Tensor):
        """Packed 2:4 weight reused while neither weight nor mask changes (eval / inference)."""
        dtype = compute_dtype(x)
        if semi_structured_unavailable(x.device, dtype, self.weight.shape, self.n, self.m, self.backend) is not None:
            return None
        key = (self.weight._version, self.weight_mask._version, dtype, self.n)
        if self._packed is None or self._packed[0] != key:
            try:
                self._packed = (key, pack_2to4(self.effective_weight().to(dtype)))
            except RuntimeError:
                return None  # nm_linear retries, records the failure and warns
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._cached_packing(x) if self.backend != "dense" and not torch.is_grad_enabled() else None
        # SR-STE decay goes into .grad once per step (Sparsifier.before_optimizer_step), not here
        return nm_linear(x, self.weight, self.weight_mask, self.bias, n=self.n, m=self.m, mode=self.mode, backend=self.backend, packed=packed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.n}:{self.m}, mode={self.mode}"


def select_layers(model: nn.Module, patterns) -> Dict[str, nn.Linear]:
    """Linear layers whose qualified name matches any fnmatch pattern (e.g. "*.q_proj")."""
    chosen = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not chosen:
        linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)][:8]
        raise ValueError(f"sparsity.layers {list(patterns)} matched no nn.Linear; linear layers look like {linears}")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(name, p) for name in chosen):
            logger.warning("sparsity.layers pattern %r matched no linear layer", p)
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def gradual_n(step: int, cfg: SparsityConfig) -> int:
    """Kept entries per group at `step` under the ramp: the target sparsity 1 - n/m is reached
    along s(t) = s_final * (1 - (1 - t)^power), t = progress through [ramp_start, ramp_end]
    (cubic = Zhu & Gupta gradual pruning), rounded down to whole entries per group."""
    if cfg.schedule == "none":
        return cfg.n
    t = min(max((step - cfg.ramp_start_step) / (cfg.ramp_end_step - cfg.ramp_start_step), 0.0), 1.0)
    pruned = (cfg.m - cfg.n) * (1.0 - (1.0 - t) ** cfg.ramp_power)
    return cfg.m - math.floor(pruned + 1e-9)


class Sparsifier:
    """Owns the N:M layers of one model: mask init, per-step upkeep, state for resume, export."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig):
        cfg.validate()
        self.model, self.cfg = model, cfg
        targets = select_layers(model, cfg.layers)
        embedding_weights = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
        for name, lin in targets.items():
            if isinstance(lin, NMSparseLinear):
                raise ValueError(f"sparsity: layer {name} is already sparse; build one Sparsifier per model")
            if lin.in_features % cfg.m:
                raise ValueError(f"sparsity: layer {name} has in_features={lin.in_features}, not divisible by m={cfg.m}")
            if id(lin.weight) in embedding_weights:
                raise ValueError(f"sparsity: layer {name} shares its weight with the embedding (tie_embeddings); keep it dense")
        self.layers: Dict[str, NMSparseLinear] = {}
        for name, lin in targets.items():
            sparse = NMSparseLinear.from_linear(lin, n=cfg.m, m=cfg.m, mode=cfg.mode, backend=cfg.backend)
            _set_submodule(model, name, sparse)
            self.layers[name] = sparse
        self.n = cfg.m  # dense until init_masks
        self.input_norms: Dict[str, torch.Tensor] = {}
        self.initialized = False
        self._decay_pending = False

    # ---- masks -------------------------------------------------------------------------
    def init_masks(self, calibration_batches: Optional[Iterable] = None, forward_fn=None) -> None:
        """One-shot masks from the current (dense) weights: magnitude, or Wanda with activation
        norms from `calibration_batches` (token tensors; `forward_fn(model, batch)` if needed)."""
        if self.cfg.method == "wanda":
            if calibration_batches is None:
                raise ValueError("sparsity.method=wanda: init_masks needs calibration_batches")
            self.input_norms = collect_input_norms(self.model, self.layers, calibration_batches, forward_fn)
        self._recompute(gradual_n(0, self.cfg))
        self.initialized = True

    def n_at(self, step: int) -> int:
        return gradual_n(step, self.cfg)

    @torch.no_grad()
    def _recompute(self, n: int) -> None:
        for name, layer in self.layers.items():
            scores = wanda_scores(layer.weight, self.input_norms[name]) if name in self.input_norms else None
            layer.weight_mask.copy_(nm_mask(layer.weight, n, self.cfg.m, scores=scores))
            layer.n = n
        self.n = n
        if self.cfg.mode == "fixed":
            self._zero_pruned()

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        for layer in self.layers.values():
            layer.weight.mul_(layer.weight_mask)

    # ---- per-step hooks ----------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """SR-STE: grad += lambda * (1 - M) * W, once per optimizer step, after all backward
        passes and after unscaling (so accumulation and loss scaling do not change lambda)."""
        self._check_initialized()
        if self.cfg.mode != "srste" or not self.cfg.srste_decay:
            return
        for layer in self.layers.values():
            if layer.weight.grad is not None:
                layer.weight.grad.addcmul_((~layer.weight_mask).to(layer.weight.dtype), layer.weight, value=self.cfg.srste_decay)
        self._decay_pending = True

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> bool:
        """Call after optimizer.step(); `step` = optimizer steps done (1 after the first).
        fixed: pruned weights back to exactly 0 (optimizers with weight decay/momentum quirks);
        srste: masks recomputed from |W| (or Wanda scores) every mask_update_every steps;
        gradual: masks recomputed whenever the ramp drops n. Returns True if masks changed."""
        self._check_initialized()
        if self.cfg.mode == "srste" and self.cfg.srste_decay and not self._decay_pending:
            raise RuntimeError("Sparsifier: SR-STE decay was not applied; call before_optimizer_step() between backward and optimizer.step()")
        self._decay_pending = False
        n = self.n_at(step)
        update = n != self.n or (self.cfg.mode == "srste" and step % self.cfg.mask_update_every == 0)
        if update:
            self._recompute(n)
        elif self.cfg.mode == "fixed":
            self._zero_pruned()
        return update

    def _check_initialized(self) -> None:
        if not self.initialized:
            raise RuntimeError("Sparsifier: call init_masks() (fresh start) or load_state_dict() (resume) first")

    # ---- checkpoint / export -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "m": self.cfg.m,
            "masks": {name: layer.weight_mask.detach().cpu().clone() for name, layer in self.layers.items()},
            "input_norms": {name: t.detach().cpu().clone() for name, t in self.input_norms.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["m"] != self.cfg.m or set(state["masks"]) != set(self.layers):
            raise ValueError(f"Sparsifier.load_state_dict: checkpoint has m={state['m']} and layers {sorted(state['masks'])[:4]}..., expected m={self.cfg.m} and {sorted(self.layers)[:4]}...")
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.weight_mask.copy_(state["masks"][name])
                layer.n = state["n"]
        self.n = state["n"]
        self.input_norms = {name: t.clone() for name, t in state["input_norms"].items()}
        self.initialized = True

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """model.state_dict() with the masks applied: dense key names, N:M zeros in the weights."""
        state = self.model.state_dict()
        key_of = {id(t): key for key, t in self.model.state_dict(keep_vars=True).items()}
        for layer in self.layers.values():
            state[key_of[id(layer.weight)]] = layer.effective_weight()
        return state

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Bake masks into the weights and swap plain nn.Linear back in (same Parameters), e.g.
        before an HF export or for a dense-kernel inference run. The Sparsifier is spent."""
        for name, layer in self.layers.items():
            layer.weight.mul_(layer.weight_mask)
            with torch.device("meta"):
                lin = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
            lin.weight, lin.bias = layer.weight, layer.bias
            lin.train(layer.training)
            _set_submodule(self.model, name, lin)
        self.layers = {}
        return self.model
