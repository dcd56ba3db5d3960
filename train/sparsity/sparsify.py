"""Make a model's linear layers N:M sparse from the outside, and keep them N:M while training.

How: each selected linear layer becomes N:M sparse *in place*: its class is switched to a subclass
(`NMSparseLinear` for nn.Linear; for megatron-core's tensor-parallel linears a subclass of theirs, see
`nm_class_for`) that keeps the very same `weight`/`bias` Parameter objects and adds a non-persistent
bool `weight_mask` buffer; its forward multiplies weight by mask (nm_linear: 2:4 packed matmul on GPU
where allowed). In place, because the engines wrap the model before the recipe attaches: DeepSpeed
ZeRO-3 has registered its parameter-gathering hooks on these very module objects, DDP its gradient
hooks on these Parameters, TP has already swapped nn.Linear for megatron's layers.

Why not torch.nn.utils.parametrize: it renames the weight to
`...q_proj.parametrizations.weight.original`, so checkpoints and the HF export would need key
translation, and it only yields a masked dense weight: running the packed 2:4 matmul would
still need a module of our own.
Why not a forward pre-hook: a hook cannot change which tensor F.linear reads without
temporarily replacing the registered Parameter each call, which breaks under activation
checkpoint recompute and FSDP. The subclass keeps `isinstance(m, nn.Linear)`, the parameter
names, and the Parameter objects (an optimizer built before or after stays valid), and
`model.state_dict()` has exactly the dense model's keys (masks travel in `Sparsifier.state_dict`).

Sharded weights: the mask has the shape of the weight this rank holds. Tensor parallel: a
column-parallel shard (q/k/v/gate/up, split over outputs) keeps whole rows; a row-parallel one
(o/down, split over inputs) keeps whole groups of m when in_features / tp divides by m (legality.py
checks it), so masks computed on each shard are the single-process masks. ZeRO-3 holds 1/dp of the
flattened weight, which cuts groups anywhere: masks are computed on the full weight gathered for
the purpose (`full_params`), and kept whole on every rank (1 byte per weight) so that the forward,
where ZeRO-3 has gathered the weight anyway, multiplies whole by whole.

Trainer protocol (`step` = optimizer steps done, 1 after the first):
    teacher = make_teacher(model, cfg.distill.teacher_dtype)   # dense copy, BEFORE sparsifying
    sparsifier = Sparsifier(model, cfg)                  # after loading dense weights (before or after wrapping)
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

import contextlib
import fnmatch
import logging
import math
from typing import Callable, ContextManager, Dict, Iterable, List, Optional

import torch
from torch import nn

from sparsetron.configs.schema.sparsity import SparsityConfig
from sparsetron.kernels.nm_sparse import masked_weight, nm_linear, nm_mask, semi_structured_unavailable
from sparsetron.kernels.nm_sparse.semi_structured import compute_dtype, pack_2to4

from .wanda import collect_input_norms, wanda_scores

logger = logging.getLogger(__name__)


class NMMasked:
    """The N:M part of a sparse linear layer (mixin): pattern, mode, backend, SR-STE decay applied in
    backward (0: the Sparsifier adds it to .grad once per step instead) and the bool `weight_mask`
    (N:M along in_features) of the weight this rank holds."""

    n: int
    m: int
    weight: nn.Parameter

    def _init_nm(self, n: int, m: int, mode: str, backend: str) -> None:
        self.n, self.m, self.mode, self.backend, self.decay = n, m, mode, backend, 0.0
        shape = getattr(self.weight, "ds_shape", self.weight.shape)  # ZeRO-3: the full shape, not the partition
        self.register_buffer("weight_mask", torch.ones(shape, dtype=torch.bool, device=self.weight.device),
                             persistent=False)
        self._packed = None  # (key, packed 2:4 weight) for no-grad forwards

    def effective_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.weight_mask


class NMSparseLinear(NMMasked, nn.Linear):
    """nn.Linear whose forward uses weight * weight_mask (N:M along in_features)."""

    def __init__(self, in_features, out_features, bias=True, *, n=2, m=4, mode="srste", backend="auto", device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_nm(n, m, mode, backend)

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
        # SR-STE decay goes into .grad once per step (Sparsifier.before_optimizer_step), or, where the engine keeps
        # gradients in its own buffers (DeepSpeed), into backward as `decay` (Sparsifier.decay_in_backward)
        return nm_linear(x, self.weight, self.weight_mask, self.bias, n=self.n, m=self.m, mode=self.mode,
                         backend=self.backend, decay=self.decay, packed=packed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.n}:{self.m}, mode={self.mode}"


class NMTensorParallelLinear(NMMasked):
    """Mixin for megatron-core's Column/RowParallelLinear (parallel/tensor_parallel.py): every matmul of
    theirs goes through `_forward_impl(input, weight, ...)`, which gets the masked shard instead (SR-STE
    or fixed gradient rule; a masked dense matmul, no 2:4 packing)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return super()._forward_impl(input, masked_weight(weight, self.weight_mask, self.mode, self.decay), *args, **kwargs)


_NM_CLASSES: Dict[type, type] = {}


def is_tensor_parallel_linear(module: nn.Module) -> bool:
    """A megatron-core linear holding a tensor-parallel shard (parallel/tensor_parallel.py)."""
    weight = getattr(module, "weight", None)
    return (hasattr(type(module), "_forward_impl") and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(weight, "tensor_model_parallel", False))


def nm_class_for(cls: type) -> type:
    """The N:M class a linear of class `cls` becomes: NMSparseLinear for nn.Linear, a subclass of a
    tensor-parallel layer class for its shards."""
    if issubclass(cls, NMMasked):
        return cls
    if issubclass(cls, nn.Linear):
        return NMSparseLinear
    if cls not in _NM_CLASSES:
        _NM_CLASSES[cls] = type(f"NM{cls.__name__}", (NMTensorParallelLinear, cls), {"_dense_class": cls})
    return _NM_CLASSES[cls]


def make_sparse(module: nn.Module, n: int, m: int, mode: str, backend: str) -> NMMasked:
    """Turn a linear layer N:M sparse in place (same object, same Parameters); mask all-ones."""
    dense = type(module)
    module.__class__ = nm_class_for(dense)
    module._dense_class = dense
    module._init_nm(n, m, mode, backend)
    return module


def make_dense(module: NMMasked) -> nn.Module:
    """Undo make_sparse (the weights keep whatever values they have)."""
    del module._buffers["weight_mask"]
    for attr in ("n", "m", "mode", "backend", "decay", "_packed"):
        module.__dict__.pop(attr, None)
    module.__class__ = module.__dict__.pop("_dense_class", nn.Linear)
    return module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NMMasked)) or is_tensor_parallel_linear(module)


def named_modules(model) -> Dict[str, nn.Module]:
    """name -> module over one model or a list of modules (pipeline stages, which keep the full model's
    names); a module reachable under two names counts under its first."""
    out: Dict[str, nn.Module] = {}
    seen = set()
    for root in (model if isinstance(model, (list, tuple)) else [model]):
        for name, mod in root.named_modules():
            if id(mod) not in seen and name not in out:
                seen.add(id(mod))
                out[name] = mod
    return out


def select_layers(model, patterns) -> Dict[str, nn.Module]:
    """Linear layers (nn.Linear, or a tensor-parallel shard of one) whose qualified name matches any
    fnmatch pattern (e.g. "*.q_proj"). `model`: a module or a list of them (pipeline stages)."""
    modules = named_modules(model)
    chosen = {name: mod for name, mod in modules.items() if _is_linear(mod) and any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not chosen:
        linears = [name for name, mod in modules.items() if _is_linear(mod)][:8]
        raise ValueError(f"sparsity.layers {list(patterns)} matched no nn.Linear; linear layers look like {linears}")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(name, p) for name in chosen):
            logger.warning("sparsity.layers pattern %r matched no linear layer", p)
    return chosen


def gradual_n(step: int, cfg: SparsityConfig) -> int:
    """Kept entries per group at `step` under the ramp: the target sparsity 1 - n/m is reached
    along s(t) = s_final * (1 - (1 - t)^power), t = progress through [ramp_start, ramp_end]
    (cubic = Zhu & Gupta gradual pruning), rounded down to whole entries per group."""
    if cfg.schedule == "none":
        return cfg.n
    t = min(max((step - cfg.ramp_start_step) / (cfg.ramp_end_step - cfg.ramp_start_step), 0.0), 1.0)
    pruned = (cfg.m - cfg.n) * (1.0 - (1.0 - t) ** cfg.ramp_power)
    return cfg.m - math.floor(pruned + 1e-9)


def _embedding_weights(model) -> set:
    return {id(mod.weight) for mod in named_modules(model).values()
            if isinstance(mod, nn.Embedding) or type(mod).__name__.endswith("Embedding")}


class Sparsifier:
    """Owns the N:M layers of one model: mask init, per-step upkeep, state for resume, export.

    `model`: a module, or the list of modules this rank holds (pipeline stages). `full_params(params)`:
    a context in which `params` hold their full values (ZeRO-3 gathers its partitions; default: they
    always do). `norm_group`: where Wanda's activation norms are summed (the data-parallel group: the
    ranks that hold the same layers)."""

    def __init__(self, model, cfg: SparsityConfig, full_params: Optional[Callable[[List[nn.Parameter]], ContextManager]] = None,
                 norm_group=None):
        cfg.validate()
        self.model, self.cfg = model, cfg
        self.full_params = full_params or (lambda params: contextlib.nullcontext())
        self.norm_group = norm_group
        targets = select_layers(model, cfg.layers)
        embedding_weights = _embedding_weights(model)
        for name, lin in targets.items():
            if isinstance(lin, NMMasked):
                raise ValueError(f"sparsity: layer {name} is already sparse; build one Sparsifier per model")
            in_features = getattr(lin.weight, "ds_shape", lin.weight.shape)[-1]  # this rank's shard under TP
            if in_features % cfg.m:
                raise ValueError(f"sparsity: layer {name} has in_features={in_features}, not divisible by m={cfg.m}")
            if id(lin.weight) in embedding_weights:
                raise ValueError(f"sparsity: layer {name} shares its weight with the embedding (tie_embeddings); keep it dense")
        self.layers: Dict[str, NMMasked] = {name: make_sparse(lin, cfg.m, cfg.m, cfg.mode, cfg.backend)
                                            for name, lin in targets.items()}
        self.n = cfg.m  # dense until init_masks
        self.input_norms: Dict[str, torch.Tensor] = {}
        self.initialized = False
        self._decay_pending = False
        self._decay_in_backward = False

    def decay_in_backward(self, micro_batches: int) -> None:
        """For engines whose gradients never sit in param.grad between backward and the step (DeepSpeed
        ZeRO): add the SR-STE decay inside each micro-batch's backward, decay / micro_batches each, so
        that the step's gradient gets it once (no loss scaling: bf16/fp32)."""
        self._decay_in_backward = self.cfg.mode == "srste" and bool(self.cfg.srste_decay)
        for layer in self.layers.values():
            layer.decay = self.cfg.srste_decay / micro_batches if self._decay_in_backward else 0.0

    # ---- masks -------------------------------------------------------------------------
    def init_masks(self, calibration_batches: Optional[Iterable] = None, forward_fn=None) -> None:
        """One-shot masks from the current (dense) weights: magnitude, or Wanda with activation
        norms from `calibration_batches` (token tensors; `forward_fn(model, batch)` if needed)."""
        if self.cfg.method == "wanda":
            if calibration_batches is None:
                raise ValueError("sparsity.method=wanda: init_masks needs calibration_batches")
            self.input_norms = collect_input_norms(self.model, self.layers, calibration_batches, forward_fn,
                                                   group=self.norm_group)
        self._recompute(gradual_n(0, self.cfg))
        self.initialized = True

    def n_at(self, step: int) -> int:
        return gradual_n(step, self.cfg)

    @torch.no_grad()
    def _recompute(self, n: int) -> None:
        for name, layer in self.layers.items():
            with self.full_params([layer.weight]):  # one layer at a time: ZeRO-3 gathers it whole, then frees it
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
        if self._decay_in_backward:  # already in the gradients (decay_in_backward)
            self._decay_pending = True
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
        """model.state_dict() with the masks applied: dense key names, N:M zeros in the weights (one
        whole model)."""
        state = self.model.state_dict()
        key_of = {id(t): key for key, t in self.model.state_dict(keep_vars=True).items()}
        for layer in self.layers.values():
            state[key_of[id(layer.weight)]] = layer.effective_weight()
        return state

    @torch.no_grad()
    def finalize(self):
        """Bake masks into the weights and turn the layers back into their dense class (same objects,
        same Parameters), e.g. before an HF export or for a dense-kernel inference run. The Sparsifier
        is spent."""
        for layer in self.layers.values():
            layer.weight.mul_(layer.weight_mask)
            make_dense(layer)
        self.layers = {}
        return self.model
