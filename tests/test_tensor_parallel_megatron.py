"""parallel/tensor_parallel.py on megatron-core: the TP shards are megatron-core's modules, and a
TP=2 model (2 processes, gloo) computes the loss, logits and every gradient of the unsharded
model on fresh random inputs (with and without sequence parallel, tied and untied embeddings,
an odd batch so that SP's token split crosses sequence boundaries, activation checkpointing,
blocks compiled with fullgraph=True).
The training-level parity over many layouts is tests/test_parallel_parity.py."""

import copy
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TP = 2
MODEL = {"vocab_size": 128, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96, "max_seq_len": 32}
B, S = 3, 16  # B*S/tp = 24 tokens per rank under SP: 1.5 sequences


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _token_shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a (B, S, ...) tensor under SP: a contiguous run of the flattened tokens."""
    flat = t.reshape(B * S, *t.shape[2:])
    n = B * S // TP
    return flat[rank * n : (rank + 1) * n].reshape(B, S // TP, *t.shape[2:])


def _check_layers(rank: int, group, sp: bool) -> None:
    """A column + row parallel pair (megatron classes) against two nn.Linear in float64: forward,
    input and weight gradients, in fp32 and under CPU bf16 autocast."""
    from sparsetron.parallel import tensor_parallel as tpm

    mtp = tpm._mcore().mtp  # (imports megatron-core quietly)
    ctx = tpm.TPContext(group, TP, sp)
    g = torch.Generator().manual_seed(1)
    up, down = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        up.weight.copy_(torch.randn(96, 64, generator=g))
        down.weight.copy_(torch.randn(64, 96, generator=g))
    col, row = tpm._column("up", up, ctx, rank), tpm._row("down", down, ctx, rank)
    assert isinstance(col, mtp.ColumnParallelLinear) and isinstance(row, mtp.RowParallelLinear)
    assert col.weight.shape == (48, 64) and row.weight.shape == (64, 48)
    assert col.weight.tensor_model_parallel and row.weight.partition_dim == 1

    x = torch.randn(B, S, 64, generator=g)
    dy = torch.randn(B, S, 64, generator=g)
    x64 = x.double().requires_grad_()
    w_up, w_down = (w.detach().double().requires_grad_() for w in (up.weight, down.weight))
    y64 = torch.nn.functional.silu(x64 @ w_up.t()) @ w_down.t()
    (y64 * dy.double()).sum().backward()

    # fp32, then CPU bf16 autocast (megatron replays only CUDA autocast in its backward)
    for autocast, tol in ((False, 1e-5), (True, 1e-2)):
        col.weight.grad = row.weight.grad = None
        x_local = (_token_shard(x, rank) if sp else x).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = row(torch.nn.functional.silu(col(ctx.enter(x_local))))
        want_y = _token_shard(y64, rank) if sp else y64
        assert y.shape == want_y.shape and y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert _rel(y, want_y) < tol
        (y * (_token_shard(dy, rank) if sp else dy)).sum().backward()
        assert col.weight.grad.dtype == row.weight.grad.dtype == torch.float32
        assert _rel(x_local.grad, _token_shard(x64.grad, rank) if sp else x64.grad) < tol
        assert _rel(col.weight.grad, w_up.grad[rank * 48 : (rank + 1) * 48]) < tol
        assert _rel(row.weight.grad, w_down.grad[:, rank * 48 : (rank + 1) * 48]) < tol


def _check_model(rank: int, group, sp: bool, tied: bool, checkpointing: str, compiled: bool) -> None:
    """The parallelized Llama against the unsharded one: names, weights, logits, loss, every gradient."""
    from sparsetron.configs.schema import ModelConfig
    from sparsetron.parallel import reshard
    from sparsetron.parallel.groups import ParallelGroups
    from sparsetron.parallel.tensor_parallel import (
        _mcore,
        parallelize,
        sequence_parallel_params,
        vocab_parallel_cross_entropy,
    )
    from sparsetron.train.model import Llama

    mtp, parallel_state = _mcore().mtp, _mcore().parallel_state
    torch.manual_seed(0)
    ref = Llama(ModelConfig(**MODEL, tie_embeddings=tied, activation_checkpointing=checkpointing))
    model = parallelize(copy.deepcopy(ref), ParallelGroups(tp=TP, rank=rank, tp_rank=rank, tp_group=group),
                        types.SimpleNamespace(sequence_parallel=sp))

    block = model.layers[0]
    for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj,
                model.head):
        assert isinstance(lin, mtp.ColumnParallelLinear)
    for lin in (block.attn.o_proj, block.mlp.down_proj):
        assert isinstance(lin, mtp.RowParallelLinear)
    assert isinstance(model.embed, mtp.VocabParallelEmbedding)
    assert (model.head.weight is model.embed.weight) == tied
    if compiled:  # the engines' compile_blocks; fullgraph: no graph break around megatron's functions
        for blk in model.layers:
            blk.compile(backend="aot_eager", fullgraph=True)

    # the full model's names, no bias / _extra_state entries, each value this rank's slice
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    for name, t in sd.items():
        assert torch.equal(t, reshard.tp_slice(name, ref_sd[name], TP, rank)), name

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, MODEL["vocab_size"], (B, S), generator=g)
    targets = torch.randint(0, MODEL["vocab_size"], (B, S), generator=g)
    targets[0, :5] = -100  # ignored positions stay ignored

    with torch.no_grad():
        logits, ref_logits = model(tokens), ref(tokens)
    per = MODEL["vocab_size"] // TP
    assert _rel(logits, ref_logits[..., rank * per : (rank + 1) * per]) < 1e-5

    ref_loss = ref(tokens, targets)
    ref_loss.backward()
    loss = model(tokens, targets)
    loss.backward()
    assert parallel_state._TENSOR_MODEL_PARALLEL_GROUP is None  # the loss's scope restored megatron's state
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for prm in sequence_parallel_params(model):  # what the engines' finalize_grads do under SP
        dist.all_reduce(prm.grad, group=group)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, prm in model.named_parameters():
        want = reshard.tp_slice(name, ref_grads[name], TP, rank)
        assert prm.grad.shape == want.shape, name
        assert _rel(prm.grad, want) < 2e-5, (name, _rel(prm.grad, want))

    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_cross_entropy(logits, targets, 1 - rank, group)


def _worker(rank: int, store: str, sp: bool, tied: bool, checkpointing: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=TP)
    try:
        group = dist.new_group([0, 1])
        _check_layers(rank, group, sp)
        _check_model(rank, group, sp, tied, checkpointing, compiled)
    finally:
        dist.destroy_process_group()


# selective checkpointing keeps matmul outputs, which megatron's row-parallel layer all-reduces in
# place (the first case failed before RowParallelLinear._forward_impl reduced a copy)
@pytest.mark.parametrize("sp, tied, checkpointing, compiled", [
    (False, False, "selective", False), (True, True, "full", False), (False, True, "selective", True)],
    ids=["tp2-untied-selective_ckpt", "tp2-sp-tied-full_ckpt", "tp2-tied-selective_ckpt-compiled"])
def test_megatron_tp2_matches_unsharded(tmp_path, sp, tied, checkpointing, compiled):
    # imported by its package name so that the spawned processes can unpickle the worker
    from sparsetron.tests import test_tensor_parallel_megatron as this

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(this._worker, args=(str(tmp_path / "store"), sp, tied, checkpointing, compiled), nprocs=TP, join=True)
