"""moe.capacity_factor (GShard/Switch token dropping): which assignments survive (against a plain-Python
reference), no-drop equals plain top-k, fully dropped tokens get zero MoE output, gradients against a
reference loop, every expert implementation, EP=2 over gloo (logged fractions and config errors:
tests/test_moe_capacity_config.py, above the model layer)."""

import importlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsetron.configs.schema.moe import MoEConfig
from sparsetron.kernels._triton import interpreting
from sparsetron.kernels.moe.grouped_mm_anchor import grouped_mm_available
from sparsetron.kernels.moe.reference import swiglu_expert
from sparsetron.train.model.moe.layer import MoEMLP
from sparsetron.train.model.moe.router import Router, capacity_mask, expert_capacity

# Routing semantics are device-independent: run on the CPU (the GPU case of the kernels is the
# implementation test below, which picks its device itself).
pytestmark = pytest.mark.cpu


def reference_keep(score: torch.Tensor, topk_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per expert: the tokens that chose it, best score first (ties: lower token index), first `capacity` kept."""
    t, e = score.shape
    s, m = score.tolist(), topk_mask.tolist()
    keep = torch.zeros(t, e, dtype=torch.bool)
    for j in range(e):
        chosen = sorted((i for i in range(t) if m[i][j]), key=lambda i: (-s[i][j], i))
        for i in chosen[:capacity]:
            keep[i, j] = True
    return keep


def routed_pairs(routing):
    """{(token, expert): weight} of a Routing."""
    expert = torch.repeat_interleave(torch.arange(routing.num_experts, device="cpu"), routing.counts.long().cpu())
    return {(int(t), int(e)): float(w) for t, e, w in zip(routing.sorted_token.cpu(), expert, routing.sorted_weight.detach().cpu())}


def router_scores(r: Router, x: torch.Tensor) -> torch.Tensor:
    """The router's own fp32 scores (same ops as Router.forward), so the reference ranks the same values."""
    logits = x.float() @ r.weight.detach().float().t()
    return logits.softmax(-1) if r.score_func == "softmax" else torch.sigmoid(logits)


def test_expert_capacity_formula():
    assert expert_capacity(1.25, 64, 2, 8) == 20  # 1.25 * 64 * 2 / 8 = 20 exactly
    assert expert_capacity(1.0, 10, 1, 3) == 4  # ceil(3.33)
    assert expert_capacity(1.1, 10, 1, 1) == 11  # float noise 11.000000000000002 does not add a slot
    assert expert_capacity(0.01, 10, 1, 8) == 1


@pytest.mark.parametrize("t,e,k,capacity", [(50, 8, 2, 7), (33, 5, 3, 1), (64, 16, 4, 20), (17, 4, 1, 16)])
def test_capacity_mask_matches_python_reference_with_ties(t, e, k, capacity):
    torch.manual_seed(t * e + capacity)
    # few distinct values (many exact ties), negative ones and -0.0 included: the int keys must order
    # every float like the comparison does
    score = torch.randint(-3, 4, (t, e)).float() / 2
    score[score == 0] = -0.0
    sel_idx = torch.rand(t, e).topk(k, dim=1).indices
    topk_mask = torch.zeros(t, e, dtype=torch.bool).scatter_(1, sel_idx, True)
    keep = capacity_mask(score, topk_mask, capacity)
    assert torch.equal(keep, reference_keep(score, topk_mask, capacity))
    assert (keep.sum(0) <= capacity).all() and not (keep & ~topk_mask).any()
    assert torch.equal(keep.sum(0), topk_mask.sum(0).clamp(max=capacity))


@pytest.mark.parametrize("score_func,k,cf", [("softmax", 2, 1.0), ("softmax", 1, 0.7), ("sigmoid", 3, 1.25)])
def test_router_drops_by_score_and_keeps_unnormalised_weights(score_func, k, cf):
    torch.manual_seed(k)
    t, e = 96, 8
    r = Router(16, e, k, score_func=score_func, capacity_factor=cf, load_balancing="none")
    r.weight.data[1] *= 5  # skewed gate: expert loads well past the capacity
    x = torch.randn(t, 16)
    routing, _, stats = r(x)
    scores = router_scores(r, x)
    topk_idx = scores.topk(k, dim=1).indices
    topk_mask = torch.zeros(t, e, dtype=torch.bool).scatter_(1, topk_idx, True)
    cap = math.ceil(cf * t * k / e)
    keep = reference_keep(scores, topk_mask, cap)
    assert (topk_mask & ~keep).any(), "the test must actually drop"
    pairs = routed_pairs(routing)
    assert set(pairs) == {(i, j) for i, j in keep.nonzero().tolist()}
    # surviving assignments keep their top-k weights: normalised over the full top-k, not renormalised
    norm = r.norm_topk_prob
    w = scores / scores.gather(1, topk_idx).sum(-1, keepdim=True) if norm else scores
    for (i, j), wij in pairs.items():
        assert wij == pytest.approx(w[i, j].item(), rel=1e-6)
    n_drop = (topk_mask & ~keep).sum().item()
    assert stats["tokens_dropped"].item() == n_drop and stats["tokens_added"].item() == 0
    assert stats["dropped_assignment_fraction"].item() == pytest.approx(n_drop / (t * k))
    assert stats["dropped_token_fraction"].item() == pytest.approx((~keep.any(1)).sum().item() / t)
    assert torch.equal(stats["expert_load"], keep.sum(0).float())
    # each token's slots are contiguous in token-major order (the combine's contract)
    tok_sorted = routing.sorted_token.long()[torch.argsort(routing.dest_row.long())]
    assert (tok_sorted[1:] >= tok_sorted[:-1]).all() and routing.token_offsets[-1] == keep.sum()


def test_no_drop_equals_plain_topk():
    torch.manual_seed(1)
    t, e, k = 64, 8, 2
    plain = Router(16, e, k)
    x = torch.randn(t, 16)
    r0, aux0, _ = plain(x)
    max_load = int(r0.counts.max())
    assert max_load < t
    for cf in (max_load * e / (t * k), 100.0):  # capacity == the largest load (< T, mask path); capacity >= T
        capped = Router(16, e, k, capacity_factor=cf)
        capped.load_state_dict(plain.state_dict())
        r1, aux1, stats = capped(x)
        assert routed_pairs(r1) == routed_pairs(r0)  # same assignments, bit-identical weights
        assert torch.equal(r1.expert_offsets, r0.expert_offsets) and torch.equal(aux1, aux0)
        assert stats["tokens_dropped"] == 0 and stats["dropped_assignment_fraction"] == 0
        assert stats["dropped_token_fraction"] == 0
    assert expert_capacity(max_load * e / (t * k), t, k, e) == max_load
    # and through the layer (capacity == the largest load, mask path): the plain top-k layer's output
    cfg = dict(num_experts=e, top_k=k, expert_ffn_dim=12, implementation="torch")
    torch.manual_seed(2)
    a = MoEMLP(16, MoEConfig(**cfg))
    xs = torch.randn(2, 7, 16)
    max_load = int(a.router(xs.reshape(-1, 16))[0].counts.max())
    b = MoEMLP(16, MoEConfig(**cfg, capacity_factor=max_load * e / (14 * k)))
    b.load_state_dict(a.state_dict())
    y = b(xs)
    assert b.last_stats["tokens_dropped"] == 0 and expert_capacity(b.router.capacity_factor, 14, k, e) < 14
    torch.testing.assert_close(y, a(xs), rtol=1e-6, atol=1e-7)


def _reference_layer_loss(m: MoEMLP, x: torch.Tensor, dy: torch.Tensor, cf: float):
    """Plain loop in fp64: the router's scores (assignments picked on the layer's fp32 values), capacity
    by Python sort, output = sum over kept assignments of weight * expert(x); aux loss before dropping."""
    r = m.router
    t, e, k = x.shape[0], r.num_experts, r.top_k
    w_r = r.weight.detach().double().requires_grad_()
    w1 = m.gate_up_proj.weight.detach().double().requires_grad_()
    w2 = m.down_proj.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    scores32 = router_scores(r, x)
    topk_idx = scores32.topk(k, dim=1).indices
    topk_mask = torch.zeros(t, e, dtype=torch.bool).scatter_(1, topk_idx, True)
    keep = reference_keep(scores32, topk_mask, math.ceil(cf * t * k / e))
    p = (x64 @ w_r.t()).softmax(-1)
    denom = p.gather(1, topk_idx).sum(-1)
    rows = []
    for i in range(t):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(e):
            if keep[i, j]:
                y = y + p[i, j] / denom[i] * swiglu_expert(x64[i : i + 1], w1[j], w2[j])[0]
        rows.append(y)
    y = torch.stack(rows)
    frac = topk_mask.sum(0).double() / (t * k)
    aux = r.aux_loss_coef * e * (frac * p.mean(0)).sum()
    ((y * dy.double()).sum() + aux).backward()
    return y, keep, [x64.grad, w_r.grad, w1.grad, w2.grad]


def test_gradients_and_dropped_tokens_match_reference_loop():
    torch.manual_seed(3)
    cf = 0.5
    m = MoEMLP(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=12, implementation="torch", capacity_factor=cf,
                             aux_loss_coef=0.1))
    m.router.weight.data[0] *= 4
    x = torch.randn(40, 16, requires_grad=True)
    dy = torch.randn(40, 16)
    y = m(x)
    ((y * dy).sum() + m.aux_loss).backward()
    y_ref, keep, grads_ref = _reference_layer_loss(m, x, dy, cf)
    dead = ~keep.any(1)
    assert dead.any() and (keep.sum(1) == 1).any(), "want fully and partly dropped tokens"
    assert torch.equal(y[dead], torch.zeros_like(y[dead]))  # exactly zero: the residual carries them
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    grads = [x.grad, m.router.weight.grad, m.gate_up_proj.weight.grad, m.down_proj.weight.grad]
    for name, g, ref in zip(["x", "router", "gate_up", "down"], grads, grads_ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-6, msg=name)
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
def test_every_expert_implementation_agrees_when_dropping(impl):
    if impl == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    if impl == "grouped_mm" and (torch.cuda.is_available() or not grouped_mm_available(torch.device("cpu"), torch.float32)):
        pytest.skip("fp32 grouped_mm: CPU torch only (CUDA's is bf16-only, covered by test_layer)")
    torch.manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(num_experts=5, top_k=2, expert_ffn_dim=24, capacity_factor=0.6, load_balancing="none")
    fast = MoEMLP(32, MoEConfig(**cfg, implementation=impl)).to(dev)
    slow = MoEMLP(32, MoEConfig(**cfg, implementation="torch")).to(dev)
    slow.load_state_dict(fast.state_dict())
    fast.router.weight.data[2] *= 4
    slow.router.weight.data[2] *= 4
    x, dy = torch.randn(3, 13, 32, device=dev), torch.randn(3, 13, 32, device=dev)
    outs = []
    for m in (fast, slow):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * dy).sum().backward()
        outs.append([y, xi.grad, m.router.weight.grad, m.gate_up_proj.weight.grad, m.down_proj.weight.grad])
    assert fast.last_stats["dropped_token_fraction"] > 0
    tol = 5e-3 if dev == "cuda" else 1e-5  # tf32 dots on the GPU; exact fp32 on the CPU
    for name, a, b in zip(["out", "dx", "router", "gate_up", "down"], *outs):
        assert torch.isfinite(a).all(), name
        rel = ((a - b).double().norm() / b.double().norm()).item()
        assert rel < tol, (name, rel)


def _ep_worker(rank: int, world: int, port: int):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, load_balancing="none", implementation="torch",
                        capacity_factor=0.75)
        torch.manual_seed(0)
        full = MoEMLP(32, cfg)
        full.router.weight.data[1] *= 3
        ep = MoEMLP(32, cfg)
        ep.load_state_dict(full.state_dict())
        ep.set_ep_group(dist.group.WORLD)
        x, dy = torch.randn(world, 2, 11, 32), torch.randn(world, 2, 11, 32)
        # Each rank's capacity counts its own tokens, so the one-process reference routes every rank's
        # batch on its own and accumulates the gradients over them.
        x_full = x.clone().requires_grad_()
        drops = 0
        for s in range(world):
            (full(x_full[s]) * dy[s]).sum().backward()
            drops += int(full.last_stats["tokens_dropped"])
            if s == rank:
                with torch.no_grad():
                    y_ref = full(x_full[s])
        assert drops > 0
        x_mine = x[rank].clone().requires_grad_()
        y_mine = ep(x_mine)
        (y_mine * dy[rank]).sum().backward()
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_mine, y_ref, **tol)
        torch.testing.assert_close(x_mine.grad, x_full.grad[rank], **tol)
        per, lo = 4 // world, rank * 4 // world
        torch.testing.assert_close(ep.gate_up_proj.weight.grad, full.gate_up_proj.weight.grad[lo : lo + per], **tol)
        torch.testing.assert_close(ep.down_proj.weight.grad, full.down_proj.weight.grad[lo : lo + per], **tol)
        router_grad = ep.router.weight.grad.clone()
        dist.all_reduce(router_grad)  # replicated router: the data-parallel reduction
        torch.testing.assert_close(router_grad, full.router.weight.grad, **tol)
    finally:
        dist.destroy_process_group()


def test_capacity_under_ep2_matches_per_rank_reference():
    ep_test = importlib.import_module("sparsetron.train.model.moe.test_expert_parallel")
    # children unpickle the worker by its package module name (pytest's importlib mode renames this file)
    worker = importlib.import_module("sparsetron.train.model.moe.test_capacity")._ep_worker
    mp.spawn(worker, args=(2, ep_test._free_port()), nprocs=2, join=True)
