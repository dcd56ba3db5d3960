"""EP=2 over gloo equals EP=1: outputs, input gradients, the local experts' weight gradients and the
(all-reduced) router gradient, for the PyTorch loop and the Triton path (interpreter on CPU)."""

import importlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsetron.configs.schema.moe import MoEConfig
from sparsetron.kernels._triton import interpreting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, impls):
    from sparsetron.train.model.moe.layer import MoEMLP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for impl, rounding in impls:
            cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, load_balancing="none", implementation=impl,
                            token_rounding=rounding, tile_m=4)
            torch.manual_seed(0)
            full = MoEMLP(32, cfg)
            ep = MoEMLP(32, cfg)
            ep.load_state_dict(full.state_dict())
            ep.ep_group = dist.group.WORLD  # set as a plain attribute: the layer shards itself on first use
            x = torch.randn(world, 2, 11, 32)  # every rank builds all ranks' tokens, keeps its own
            dy = torch.randn(world, 2, 11, 32)

            x_full = x.clone().requires_grad_()
            (full(x_full) * dy).sum().backward()
            x_mine = x[rank].clone().requires_grad_()
            y_mine = ep(x_mine)
            (y_mine * dy[rank]).sum().backward()

            per = 4 // world
            assert ep.gate_up_proj.weight.shape[0] == per
            with torch.no_grad():
                y_ref = full(x_full)[rank]
            tol = dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(y_mine, y_ref, **tol)
            torch.testing.assert_close(x_mine.grad, x_full.grad[rank], **tol)
            lo = rank * per
            torch.testing.assert_close(ep.gate_up_proj.weight.grad, full.gate_up_proj.weight.grad[lo : lo + per], **tol)
            torch.testing.assert_close(ep.down_proj.weight.grad, full.down_proj.weight.grad[lo : lo + per], **tol)
            router_grad = ep.router.weight.grad.clone()
            dist.all_reduce(router_grad)  # the router is replicated: data-parallel reduction
            torch.testing.assert_close(router_grad, full.router.weight.grad, **tol)
    finally:
        dist.destroy_process_group()


def _rounding_worker(rank: int, world: int, port: int, impls):
    """Token rounding under EP rounds each rank's own batch: the EP layer's output and input gradient
    equal the unsharded layer's on that rank's tokens alone (the same rounding decisions)."""
    from sparsetron.train.model.moe.layer import MoEMLP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for impl in impls:
            cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, load_balancing="none", implementation=impl,
                            token_rounding=True, tile_m=4)
            torch.manual_seed(0)
            full = MoEMLP(32, cfg)
            ep = MoEMLP(32, cfg)
            ep.load_state_dict(full.state_dict())
            ep.ep_group = dist.group.WORLD
            x = torch.randn(world, 2, 11, 32)
            dy = torch.randn(world, 2, 11, 32)
            x_local = x[rank].clone().requires_grad_()
            (full(x_local) * dy[rank]).sum().backward()
            x_mine = x[rank].clone().requires_grad_()
            y_mine = ep(x_mine)
            (y_mine * dy[rank]).sum().backward()
            with torch.no_grad():
                y_ref = full(x[rank])
            tol = dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(y_mine, y_ref, **tol)
            torch.testing.assert_close(x_mine.grad, x_local.grad, **tol)
    finally:
        dist.destroy_process_group()


def test_ep2_with_token_rounding_matches_per_rank_layer():
    impls = ["torch"] + (["triton"] if interpreting() else [])
    worker = importlib.import_module("sparsetron.train.model.moe.test_expert_parallel")._rounding_worker
    mp.spawn(worker, args=(2, _free_port(), impls), nprocs=2, join=True)


def test_ep2_matches_ep1():
    # (token rounding is left out: it rounds counts over the batch it sees, i.e. per rank under EP)
    impls = [("torch", False)]
    if interpreting():
        impls.append(("triton", False))
    # Children unpickle the worker by module name, and pytest's importlib mode gives this file a
    # private one, so hand them the worker of the package module (TRITON_INTERPRET is inherited).
    worker = importlib.import_module("sparsetron.train.model.moe.test_expert_parallel")._worker
    mp.spawn(worker, args=(2, _free_port(), impls), nprocs=2, join=True)
