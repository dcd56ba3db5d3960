"""Router: token rounding invariants, Switch aux loss, z-loss, aux-free bias, score functions, config errors."""

import pytest
import torch

from sparsetron.kernels._triton import interpreting
from sparsetron.kernels.moe.fused_routing import max_assignments
from sparsetron.kernels.moe.token_rounding import round_expert_counts
from sparsetron.train.model.moe.router import Router


def _router(**kw):
    args = dict(dim=16, num_experts=8, top_k=2)
    args.update(kw)
    torch.manual_seed(0)
    return Router(**args)


@pytest.mark.parametrize("t,e,k,tile", [(200, 8, 2, 16), (333, 16, 4, 32), (97, 6, 1, 8)])
def test_token_rounding_invariants(t, e, k, tile):
    torch.manual_seed(t)
    r = Router(24, e, k, token_rounding=True, tile_m=tile, load_balancing="none")
    # skew the gate so loads are uneven and many counts are not tile multiples
    r.weight.data[0] *= 4
    x = torch.randn(t, 24)
    routing, _, stats = r(x)
    # a static-size plan: real rows first, then padding with weight 0
    assert routing.padded and routing.num_assignments == max_assignments(t, k, e, tile)
    assert (routing.sorted_weight[~routing.valid_rows()] == 0).all()
    routing = routing.compact()
    counts = routing.counts
    assert (counts % tile == 0).all(), counts
    pairs = routing.sorted_token.long() * e + torch.repeat_interleave(torch.arange(e), counts.long())
    assert pairs.unique().numel() == pairs.numel(), "a token routed twice to one expert"
    assert abs(counts.sum().item() / t - k) <= tile / t + 1e-9
    assert stats["experts_per_token"].item() == pytest.approx(counts.sum().item() / t)
    # which tokens moved: dropped ones are the lowest-scored of the expert's top-k tokens, added ones
    # the best-scored tokens that had not selected it
    logits = x @ r.weight.t()
    scores = logits.softmax(-1)
    topk_mask = torch.zeros(t, e, dtype=torch.bool).scatter_(1, scores.topk(k).indices, True)
    new_mask = torch.zeros(t, e, dtype=torch.bool)
    new_mask[routing.sorted_token.long(), torch.repeat_interleave(torch.arange(e), counts.long())] = True
    dropped, added = topk_mask & ~new_mask, new_mask & ~topk_mask
    assert stats["tokens_dropped"].item() == dropped.sum().item()
    assert stats["tokens_added"].item() == added.sum().item()
    for j in range(e):
        s = scores[:, j]
        if dropped[:, j].any():
            assert s[dropped[:, j]].max() <= s[topk_mask[:, j] & new_mask[:, j]].min()
        if added[:, j].any():
            rest = ~topk_mask[:, j] & ~new_mask[:, j]
            assert not rest.any() or s[added[:, j]].min() >= s[rest].max()
    # combine weights are the routed scores, normalised by the token's top-k sum
    w_expected = (scores / scores.gather(1, scores.topk(k).indices).sum(-1, keepdim=True)) if k > 1 else scores
    expert_of = torch.repeat_interleave(torch.arange(e), counts.long())
    torch.testing.assert_close(routing.sorted_weight, w_expected[routing.sorted_token.long(), expert_of])
    # each token's slots are contiguous in token-major order
    tok_sorted = routing.sorted_token.long()[torch.argsort(routing.dest_row.long())]
    assert (tok_sorted[1:] >= tok_sorted[:-1]).all()
    assert routing.token_offsets[-1].item() == counts.sum().item()


def test_round_counts_nearest_and_sum_preserved():
    counts = torch.tensor([0, 5, 12, 17, 31, 40, 64, 3])
    out = round_expert_counts(counts, 16, num_tokens=1000)
    assert (out % 16 == 0).all()
    assert ((out - counts).abs() < 16).all()
    assert abs(out.sum().item() - counts.sum().item()) <= 8
    # largest remainders (12 -> 16, 31 -> 32) go up, small ones (3, 5) go down
    assert out[2] == 16 and out[4] == 32 and out[1] == 0 and out[7] == 0


def test_switch_aux_loss_and_z_loss_values():
    r = _router(aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(64, 16)
    routing, aux, stats = r(x)
    logits = x @ r.weight.t()
    p = logits.softmax(-1)
    idx = p.topk(2).indices
    frac = torch.zeros(8).scatter_add_(0, idx.flatten(), torch.ones(128)) / 128
    switch = 0.1 * 8 * (frac * p.mean(0)).sum()
    z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(aux, switch + z)
    torch.testing.assert_close(stats["balance_loss"], switch)
    torch.testing.assert_close(stats["z_loss"], z)
    torch.testing.assert_close(stats["expert_load"], frac * 128)
    aux.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_aux_free_bias_moves_against_load_and_only_steers_selection():
    r = _router(load_balancing="aux_free", bias_lr=0.1, score_func="sigmoid")
    r.weight.data[3] += 2.0  # expert 3 is overloaded
    x = torch.randn(128, 16).abs()
    with torch.no_grad():
        routing, aux, _ = r(x)  # no grad -> no update (evaluation)
    assert aux is None and (r.expert_bias == 0).all()
    _, _, stats = r(x)
    load = stats["expert_load"]
    assert r.expert_bias[3] < 0 and r.expert_bias[load.argmin()] > 0
    # a large bias overrides the scores for selection, but the weights stay the (normalised) scores
    r.expert_bias.zero_()
    r.expert_bias[5] = 100.0
    routing, _, _ = r.eval()(x)
    assert routing.counts[5] == 128
    scores = torch.sigmoid(x @ r.weight.t())
    sel = (scores + r.expert_bias).topk(2).indices
    w = scores.gather(1, sel)
    w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.sorted_weight.sum(), w.sum())


def test_sigmoid_weights_normalised_and_softmax_k1_raw():
    r = _router(score_func="sigmoid", top_k=3)
    routing, _, _ = r(torch.randn(10, 16))
    sums = torch.zeros(10).index_add_(0, routing.sorted_token.long(), routing.sorted_weight)
    torch.testing.assert_close(sums, torch.ones(10))
    r1 = _router(top_k=1)
    x = torch.randn(10, 16)
    routing, _, _ = r1(x)
    p = (x @ r1.weight.t()).softmax(-1).max(-1).values
    torch.testing.assert_close(routing.sorted_weight[torch.argsort(routing.dest_row.long())], p)


@pytest.mark.parametrize(
    "kw,field",
    [(dict(score_func="relu"), "score_func"), (dict(load_balancing="capacity"), "load_balancing"),
     (dict(top_k=9), "top_k"), (dict(tile_m=0), "tile_m")],
)
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        _router(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_gradients_match_plain_autograd(dtype):
    """The memory-lean fp32 gate (saves x in its own dtype) gives the same gradients as F.linear."""
    r = _router(aux_loss_coef=0.1, z_loss_coef=0.01, top_k=3)
    x = torch.randn(40, 16).to(dtype).requires_grad_()
    routing, aux, _ = r(x)
    (aux + (routing.sorted_weight * torch.arange(routing.num_assignments)).sum()).backward()
    x64 = x.detach().double().requires_grad_()
    w64 = r.weight.detach().double().requires_grad_()
    p = torch.nn.functional.linear(x64, w64).softmax(-1)
    idx = torch.topk(p.detach(), 3).indices
    w = p.gather(1, idx)
    w = (w / w.sum(-1, keepdim=True)).reshape(-1)[torch.argsort(idx.reshape(-1), stable=True)]
    frac = torch.zeros(8, dtype=torch.float64).scatter_add_(0, idx.flatten(), torch.ones(120, dtype=torch.float64)) / 120
    logits = x64 @ w64.t()
    ref = 0.1 * 8 * (frac * p.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).square().mean()
    (ref + (w * torch.arange(120)).sum()).backward()
    torch.testing.assert_close(r.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-5)


ROUTER_CASES = [
    dict(score_func="softmax", load_balancing="aux_loss", top_k=2, tile_m=16),
    dict(score_func="sigmoid", load_balancing="aux_free", top_k=3, tile_m=8),  # select = scores + bias (signed)
    dict(score_func="softmax", load_balancing="none", top_k=1, tile_m=32),  # k=1: raw probabilities, no denom
]


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", ROUTER_CASES, ids=["softmax-k2", "sigmoid-auxfree-k3", "softmax-k1"])
def test_rounding_router_fused_plan_equals_reference(cfg, dtype):
    """The router's Triton (sync-free) rounding plan equals its PyTorch-reference plan: every table,
    the combine weights, the logged stats and the router/input gradients through the weights."""
    t, e = 157, 12
    outs = []
    for impl in ("triton", "torch"):
        r = _router(num_experts=e, routing_implementation=impl, token_rounding=True, **cfg)
        if cfg["load_balancing"] == "aux_free":
            r.expert_bias.copy_(torch.linspace(-0.05, 0.05, e))
        r.weight.data[0] *= 3  # uneven loads: most counts are not tile multiples
        torch.manual_seed(1)
        x = torch.randn(t, 16).to(dtype).requires_grad_()
        routing, aux, stats = r(x)
        (routing.sorted_weight * torch.arange(routing.num_assignments, dtype=torch.float32)).sum().backward()
        outs.append((routing, stats, r.weight.grad, x.grad))
    (a, sa, ga, xa), (b, sb, gb, xb) = outs
    assert a.padded and b.padded and a.num_assignments == b.num_assignments
    for name in ("sorted_token", "expert_offsets", "dest_row", "token_offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.sorted_weight, b.sorted_weight)
    for name in ("tokens_dropped", "tokens_added", "expert_load", "experts_per_token"):
        assert torch.equal(sa[name], sb[name]), name
    assert (sa["expert_load"] % cfg["tile_m"] == 0).all() and sa["tokens_dropped"] + sa["tokens_added"] > 0
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=0)
    torch.testing.assert_close(xa, xb, rtol=1e-6, atol=0)


def test_bad_routing_implementation_raises():
    with pytest.raises(ValueError, match="routing_implementation"):
        _router(routing_implementation="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
def test_rounding_router_and_experts_run_without_host_sync():
    """Router (rounding on) + Triton experts, forward and backward, with CUDA's sync check set to error."""
    from sparsetron.kernels.moe.function import moe_experts

    t, d, f, e, k = 2048, 64, 32, 16, 4
    r = Router(d, e, k, token_rounding=True, tile_m=128).cuda()
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(e, 2 * f, d, device="cuda") * 0.1).bfloat16().requires_grad_()
    w2 = (torch.randn(e, d, f, device="cuda") * 0.1).bfloat16().requires_grad_()

    def step():
        routing, aux, stats = r(x)
        y = moe_experts(x, w1, w2, routing, "triton")
        (y.float().square().mean() + aux).backward()
        return routing, stats

    step()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing, stats = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (routing.counts % 128 == 0).all() and torch.isfinite(x.grad).all()
