"""Activation-checkpointing policies for the decoder blocks (`model.activation_checkpointing`).

- none:      keep every activation (fastest while it fits).
- attention: recompute only the attention core (Megatron's "selective" recompute). With flash
             SDPA the core stores little (q, k, v are kept anyway), so this saves little memory;
             it matters for attention kinds that store S x S state.
- selective: op-level selective checkpointing of the whole block: the outputs of the
             compute-heavy ops (matmuls, attention) are saved, the cheap ones (norms, RoPE,
             SiLU, casts, adds) are recomputed in backward. Most of full's memory saving for
             a few % of extra work.
- full:      keep only each block's input; rerun the whole block in backward (~+33 % flops).

Every policy computes the same gradients as "none" (tests/test_dense_speed.py checks it).
"""

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "attention", "selective", "full")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"model.activation_checkpointing: got {policy!r}, allowed: {', '.join(POLICIES)}")
    return policy


def _saved_ops() -> set:
    """Ops whose outputs are worth keeping: matmuls and every attention implementation SDPA
    may dispatch to (names differ across torch versions, so look each one up)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _policy(saved: frozenset, recompute_every_other_mm: bool) -> Callable:
    """A fresh policy per checkpointed call. recompute_every_other_mm is torchtitan's
    SelectiveAC rule (it recomputes every second matmul to save more memory); the counters
    are separate for the forward and the recompute so both make the same decisions."""
    counts = {False: 0, True: 0}
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def decide(ctx, func, *args, **kwargs):
        if func not in saved:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if recompute_every_other_mm and func in matmuls:
            counts[ctx.is_recompute] += 1
            if counts[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return decide


def selective_context_fn(recompute_every_other_mm: bool = False) -> Callable:
    """context_fn for torch.utils.checkpoint (non-reentrant) implementing the selective policy."""
    saved = frozenset(_saved_ops())
    return lambda: create_selective_checkpoint_contexts(_policy(saved, recompute_every_other_mm))


def run_block(block: Callable, policy: str, *args, context_fn: Optional[Callable] = None):
    """block(*args) under the block-level policy ("full" / "selective"); the others run it
    plainly ("attention" is applied inside the attention module)."""
    if policy not in ("full", "selective") or not torch.is_grad_enabled():
        return block(*args)
    if policy == "selective":
        return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn or selective_context_fn())
    return checkpoint(block, *args, use_reentrant=False)


def apply_policy(model: torch.nn.Module, policy: str) -> None:
    """Set the policy on a Llama's blocks (on their attention modules for "attention")."""
    model.activation_checkpointing = check_policy(policy)
    # Blocks checkpoint themselves (Block.forward), so callers that used to wrap whole blocks
    # (parallel/pipeline.py reads this flag) must not do it again.
    model.checkpoint_blocks = False
    context_fn = selective_context_fn() if policy == "selective" else None
    for block in model.layers:
        block.checkpoint = policy if policy in ("full", "selective") else "none"
        block.checkpoint_context_fn = context_fn
        block.attn.checkpoint_core = policy == "attention"


__all__ = ["POLICIES", "apply_policy", "check_policy", "run_block", "selective_context_fn"]
