"""Tensor parallel (+ sequence parallel) for the Llama model through megatron-core's layers.

`parallelize(model, groups, pcfg)` rewrites a full, identically initialised model in place into
this tp rank's shard (Shoeybi et al. 2019; Korthikanti et al. 2022 for SP). The shards are
`megatron.core.tensor_parallel` modules, created with `perform_initialization=False` and filled
with this rank's slice of the full weights, so a TP run starts from exactly the single-process
weights:

- q/k/v and gate/up: `ColumnParallelLinear` (gather_output=False; heads stay whole);
  o/down: `RowParallelLinear` (input_is_parallel=True), which all-reduces its output, or
  reduce-scatters it under sequence parallel;
- embedding: `VocabParallelEmbedding`; head: `ColumnParallelLinear` over the vocabulary (its
  weight *is* the embedding shard when tied); loss: megatron's `vocab_parallel_cross_entropy`,
  so the (tokens, V) logits never exist whole on one rank;
- with sequence parallel the activations between sublayers (norms, residual adds) are split over
  tp, and the norm weights carry `sequence_parallel = True` (their grads are summed over tp by
  the engines after backward, as Megatron's finalize_model_grads does).

Why megatron-core's layers and not DTensor: the project uses megatron-core for TP, and its layers
hold ordinary local nn.Parameters, which is what DeepSpeed ZeRO 1-3 (it flattens and partitions
`param.data`) and our name-keyed checkpoints/reshard need; DTensor parameters would need a
separate path through ZeRO and the checkpoint code. DTensor would have been the smaller change for
torch pipelining and torch.compile, and it runs on gloo without patches; megatron-core 0.16.1
instead needs the adapters below.

Adapters (all here):
- Layout. Megatron's sequence-parallel collectives gather / reduce-scatter along dim 0 and
  expect sequence-first activations; our model is batch-first (B, S, D). Norms and residual adds
  are per token, so any split of the tokens works: we split the flattened token dimension B*S
  (rank r holds tokens [r*N/tp, (r+1)*N/tp) of the row-major (B, S) order) and store the shard as
  (B, S/tp, D), the shape pipeline stages exchange. Every gather/scatter is then a reshape (a
  view) plus megatron's dim-0 collective: no transposes, unlike converting to (S, B, D).
- One region entry per sublayer. The attention, MLP and head inputs enter the tensor-parallel
  region once (megatron's `copy_to_tensor_model_parallel_region`, or under SP
  `gather_from_sequence_parallel_region`) in a forward pre-hook, and the column-parallel layers
  run with `disable_grad_reduce=True` (megatron's switch for a delayed, fused input-grad
  reduction). q/k/v then cost one all-reduce (one all-gather + reduce-scatter under SP), not three.
- Outputs: the modules are thin subclasses that return the tensor, not megatron's (output, bias)
  tuple, and add no `_extra_state` key, so state_dict keeps the full model's names
  (`layers.0.attn.q_proj.weight`, no bias entries) for reshard.py, checkpoints and HF export.
- Process group: the layers take `tp_group` explicitly; megatron's cross-entropy reads the
  global parallel_state, which `_megatron_tp_group` sets for the duration of the loss's forward
  only (its backward has no collective). No global megatron initialisation.
- CPU: megatron-core 0.16.1 allocates the outputs of its dim-0 gather / reduce-scatter on
  `torch.cuda.current_device()`; for non-CUDA tensors those two helpers get an equivalent that
  allocates on the input's device (CUDA tensors still run megatron's own code).
- Row-parallel all-reduce: megatron reduces the matmul output in place; torch's selective
  activation checkpointing saves matmul outputs, so its recompute would reduce the saved tensor
  twice. The row layer hands megatron a copy to reduce (one (tokens, D) copy per o/down, as the
  previous hand-written code paid too; SP's reduce-scatter is out of place and skips it).
- CPU autocast: megatron's linear replays only CUDA autocast in its backward, so under CPU bf16
  autocast the operands are cast before its matmul (as autocast does for F.linear).
- `gradient_accumulation_fusion=False`, `use_cpu_initialization=True`: no apex,
  Transformer-Engine or CUDA RNG tracker needed (the model has no dropout).

megatron-core is imported on the first call with tp > 1 (it takes seconds to import)."""

import functools
import types
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


# ------------------------------------------------------------------------------ megatron-core
@functools.cache
def _mcore() -> types.SimpleNamespace:
    """megatron-core's tensor_parallel package, our layer subclasses and the CPU collective fix."""
    with warnings.catch_warnings():  # "Transformer Engine / Apex not installed": expected, we need neither
        warnings.simplefilter("ignore")
        from megatron.core import ModelParallelConfig, parallel_state
        from megatron.core import tensor_parallel as mtp
        from megatron.core.tensor_parallel import mappings

    _allow_non_cuda_sequence_collectives(mappings)

    class ColumnParallelLinear(mtp.ColumnParallelLinear):
        """Megatron's layer returning only the output (we never use a bias)."""

        get_extra_state = nn.Module.get_extra_state  # no `_extra_state` key in state_dict

        def _forward_impl(self, input, weight, *args, **kwargs):
            input, weight = _autocast_operands(input, weight)
            return super()._forward_impl(input, weight, *args, **kwargs)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowParallelLinear(mtp.RowParallelLinear):
        """Megatron's layer on the flattened tokens, so that under SP its reduce-scatter splits
        the token dimension; returns (B, S, D), or (B, S/tp, D) under SP."""

        get_extra_state = nn.Module.get_extra_state

        def _forward_impl(self, input, weight, *args, **kwargs):
            input, weight = _autocast_operands(input, weight)
            out = super()._forward_impl(input, weight, *args, **kwargs)
            # megatron all-reduces the matmul output in place; selective activation checkpointing
            # keeps that very tensor (matmul outputs are saved), so the recompute would reduce it a
            # second time: reduce a copy (SP's reduce-scatter is out of place and needs none)
            return out if self.sequence_parallel else out.clone()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lead = list(x.shape[:-1])
            out = super().forward(x.reshape(-1, x.shape[-1]))[0]
            if self.sequence_parallel:
                lead[-1] //= self.tp_group.size()
            return out.view(*lead, out.shape[-1])

    class VocabParallelEmbedding(mtp.VocabParallelEmbedding):
        """Megatron's embedding; under SP the ids go in as one (1, B*S) row so that megatron's
        [b s h] -> [s b h] reduce-scatter splits the flattened tokens (the transpose of a size-1
        dimension copies nothing)."""

        @property
        def vocab_start(self) -> int:
            return self.vocab_start_index

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if not self.reduce_scatter_embeddings:
                return super().forward(ids)
            b, s = ids.shape
            out = super().forward(ids.reshape(1, b * s))  # (B*S/tp, 1, D)
            return out.view(b, s // self.tp_group.size(), out.shape[-1])

    return types.SimpleNamespace(mtp=mtp, parallel_state=parallel_state, ModelParallelConfig=ModelParallelConfig,
                                 ColumnParallelLinear=ColumnParallelLinear, RowParallelLinear=RowParallelLinear,
                                 VocabParallelEmbedding=VocabParallelEmbedding)


def _autocast_operands(input: torch.Tensor, weight: torch.Tensor):
    """megatron's linear replays only CUDA autocast in its backward (custom_fwd/bwd for "cuda");
    under CPU autocast the backward would multiply bf16 gradients by fp32 weights. Cast both
    operands first, as autocast does for F.linear (the weight's gradient returns in fp32)."""
    device = input.device.type
    if device != "cuda" and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return input.to(dtype), weight.to(dtype)
    return input, weight


# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _allow_non_cuda_sequence_collectives(mappings) -> None:
    """megatron-core 0.16.1's `_gather_along_first_dim` / `_reduce_scatter_along_first_dim` put
    their output on torch.cuda.current_device(). For tensors elsewhere (CPU, gloo) run the same
    collective into an output on the input's device; CUDA tensors keep megatron's code."""
    if getattr(mappings, "_sparsetron_non_cuda_ok", False):
        return
    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if input_.device.type == "cuda" or output_split_sizes is not None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        out = input_.new_empty((input_.shape[0] * group.size(), *input_.shape[1:]))
        _all_gather(out, input_.contiguous(), group=group)
        return out

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_.device.type == "cuda" or input_split_sizes is not None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        if input_.shape[0] % group.size():
            raise ValueError(f"reduce-scatter: dim 0 ({input_.shape[0]}) must divide by the tp size {group.size()}")
        out = input_.new_empty((input_.shape[0] // group.size(), *input_.shape[1:]))
        _reduce_scatter(out, input_.contiguous(), group=group)
        return out

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim
    mappings._sparsetron_non_cuda_ok = True


@contextmanager
def _megatron_tp_group(group):
    """megatron's parallel_state pointing at our tp group, for code that reads it (the vocab-parallel
    cross-entropy); restored afterwards, so layouts built one after another in a process never clash."""
    ps = _mcore().parallel_state
    saved = (ps._TENSOR_MODEL_PARALLEL_GROUP, ps._MPU_TENSOR_MODEL_PARALLEL_RANK,
             ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE)
    ps._TENSOR_MODEL_PARALLEL_GROUP = group
    ps.set_tensor_model_parallel_rank(group.rank())
    ps.set_tensor_model_parallel_world_size(group.size())
    try:
        yield
    finally:
        ps._TENSOR_MODEL_PARALLEL_GROUP = saved[0]
        ps.set_tensor_model_parallel_rank(saved[1])
        ps.set_tensor_model_parallel_world_size(saved[2])


# ----------------------------------------------------------------------------------- loss
def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not ignore_index, from vocab-sharded
    logits (..., V/tp) and global target ids (megatron-core's vocab_parallel_cross_entropy).
    `vocab_start` is this rank's first vocabulary row; megatron derives it from the tp rank, so
    it must be rank * V/tp."""
    expected = group.rank() * logits.shape[-1]
    if vocab_start != expected:
        raise ValueError(f"vocab_start={vocab_start}: megatron's vocab-parallel cross-entropy gives tp rank "
                         f"{group.rank()} the rows from {expected} (rank * V/tp)")
    # megatron shifts the fp32 logits in place: keep the caller's tensor intact (a copy only when
    # they already are fp32, else .float() inside megatron copies anyway)
    logits = logits.clone() if logits.dtype == torch.float32 else logits
    valid = targets != ignore_index
    with _megatron_tp_group(group):  # backward needs no collective: the scope covers the forward only
        losses = _mcore().mtp.vocab_parallel_cross_entropy(logits, targets.masked_fill(~valid, 0))
    return (losses * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------- regions
class TPContext:
    """What the hooks and the loss need: the tp group, its size, and whether SP is on."""

    def __init__(self, group, tp: int, sequence_parallel: bool):
        self.group, self.tp, self.sp = group, tp, sequence_parallel
        mtp = _mcore().mtp  # looked up here, not in forward: a cached call would break a compiled graph
        self._copy_in, self._gather_in = mtp.copy_to_tensor_model_parallel_region, mtp.gather_from_sequence_parallel_region

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into the tensor-parallel region, once per sublayer: identity forward and all-reduced input
        gradient, or under SP the all-gather of the token shards (reduce-scatter in backward)."""
        device = x.device.type
        if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
            # the column-parallel matmuls read x in the autocast dtype anyway: casting first halves the
            # bytes of the SP all-gather and of its backward reduce-scatter (fp32 ones were ~half the
            # NCCL time of a 9B TP4 step on 4 H200s)
            x = x.to(torch.get_autocast_dtype(device))
        if not self.sp:
            return self._copy_in(x, group=self.group)
        b, s_local, d = x.shape
        full = self._gather_in(x.reshape(-1, d), tensor_parallel_output_grad=True, group=self.group)
        return full.view(b, s_local * self.tp, d)

    def pre_hook(self, module, args):
        return (self.enter(args[0]), *args[1:])


# ---------------------------------------------------------------------------------- layers
def _config(full_weight: torch.Tensor, tp: int, sequence_parallel: bool):
    return _mcore().ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, params_dtype=full_weight.dtype,
        use_cpu_initialization=True, perform_initialization=False,  # weights are copied from the full model
        gradient_accumulation_fusion=False)


def _fill(module: nn.Module, full_weight: torch.Tensor, dim: int, tp: int, rank: int) -> nn.Module:
    """Move `module` to the full weight's device and copy this rank's slice of it along `dim`."""
    per = full_weight.shape[dim] // tp
    module.to(device=full_weight.device)
    with torch.no_grad():
        module.weight.copy_(full_weight.detach().narrow(dim, rank * per, per))
    module.weight.requires_grad_(full_weight.requires_grad)
    _mcore().mtp.set_tensor_model_parallel_attributes(module.weight, True, dim, 1)
    return module


def _check_linear(name: str, lin: nn.Linear) -> None:
    if lin.bias is not None:
        raise ValueError(f"tensor parallel: {name} has a bias; sparsetron's TP shards bias-free linears only")


def _column(name: str, lin: nn.Linear, ctx: TPContext, rank: int) -> nn.Module:
    _check_linear(name, lin)
    m = _mcore().ColumnParallelLinear(
        lin.in_features, lin.out_features, config=_config(lin.weight, ctx.tp, False),
        init_method=nn.init.zeros_, bias=False, gather_output=False,
        disable_grad_reduce=True,  # the input entered the region once for the whole sublayer (TPContext)
        tp_group=ctx.group)
    return _fill(m, lin.weight, 0, ctx.tp, rank)


def _row(name: str, lin: nn.Linear, ctx: TPContext, rank: int) -> nn.Module:
    _check_linear(name, lin)
    m = _mcore().RowParallelLinear(
        lin.in_features, lin.out_features, config=_config(lin.weight, ctx.tp, ctx.sp),
        init_method=nn.init.zeros_, bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=ctx.group)
    return _fill(m, lin.weight, 1, ctx.tp, rank)


def _tp_forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, output_hidden_states: bool = False):
    """Llama.forward with a vocab-parallel loss (bound to the instance by `parallelize`). Hidden states
    (output_hidden_states) are each block's output as this rank holds it: whole, or under sequence
    parallel its (B, S/tp, D) token shard."""
    hidden_states = [] if output_hidden_states else None
    logits = self.head(self.hidden(tokens, hidden_states))  # (B, S, V/tp): the head's pre-hook gathered the tokens
    out = logits if targets is None else vocab_parallel_cross_entropy(logits, targets, self.embed.vocab_start,
                                                                       self.tp_ctx.group)
    return (out, hidden_states) if output_hidden_states else out


def parallelize(model: nn.Module, groups, pcfg) -> nn.Module:
    """Shard `model` (a full sparsetron Llama, same init on every rank) over groups.tp_group."""
    tp, rank = groups.tp, groups.tp_rank
    if tp == 1:
        return model
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("parallel.tp > 1 needs the full model on every rank; it was built under "
                         "deepspeed.zero.Init (partitioned), which TP cannot slice")
    mc = _mcore()
    ctx = TPContext(groups.tp_group, tp, bool(pcfg.sequence_parallel))
    model.tp_ctx = ctx
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        for owner, where, names in ((attn, "attn", ("q_proj", "k_proj", "v_proj")), (mlp, "mlp", ("gate_proj", "up_proj"))):
            for n in names:
                setattr(owner, n, _column(f"layers.{i}.{where}.{n}", getattr(owner, n), ctx, rank))
        attn.o_proj = _row(f"layers.{i}.attn.o_proj", attn.o_proj, ctx, rank)
        mlp.down_proj = _row(f"layers.{i}.mlp.down_proj", mlp.down_proj, ctx, rank)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        attn.register_forward_pre_hook(ctx.pre_hook)
        mlp.register_forward_pre_hook(ctx.pre_hook)
        for norm in (block.attn_norm, block.mlp_norm):
            norm.weight.sequence_parallel = ctx.sp
    model.norm.weight.sequence_parallel = ctx.sp

    full_embed = model.embed.weight
    embed = mc.VocabParallelEmbedding(full_embed.shape[0], full_embed.shape[1], init_method=nn.init.zeros_,
                                      reduce_scatter_embeddings=ctx.sp, config=_config(full_embed, tp, ctx.sp),
                                      tp_group=ctx.group)
    model.embed = _fill(embed, full_embed, 0, tp, rank)
    head = _column("head", model.head, ctx, rank) if not model.cfg.tie_embeddings else None
    if head is None:  # tied: the head's weight is the embedding shard itself
        head = mc.ColumnParallelLinear(full_embed.shape[1], full_embed.shape[0], config=_config(full_embed, tp, False),
                                       init_method=nn.init.zeros_, bias=False, gather_output=False,
                                       disable_grad_reduce=True, tp_group=ctx.group)
        head.weight = model.embed.weight
    model.head = head
    model.head.register_forward_pre_hook(ctx.pre_hook)
    model.forward = types.MethodType(_tp_forward, model)
    return model


def sequence_parallel_params(module: nn.Module):
    """Replicated parameters that saw only this rank's part of the sequence (grads summed over tp)."""
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]
