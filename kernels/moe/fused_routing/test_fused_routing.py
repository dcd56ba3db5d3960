"""Sync-free routing tables (Triton, interpreter on CPU) vs the PyTorch reference, exactly, at ragged
shapes (T not a multiple of any block or tile, E = 5..128, k = 1..8), with fp32, bf16 (many exact
ties) and tie-heavy signed scores; vs the pre-existing token-rounding code (float topk) where it is
deterministic; padded plans through the expert kernels and the combine weights' gradients; no host
sync on CUDA."""

import pytest
import torch

from sparsetron.kernels._triton import interpreting
from sparsetron.kernels.moe.fused_routing import RoutingBlocks, max_assignments, route_tokens
from sparsetron.kernels.moe.function import Blocks, moe_experts
from sparsetron.kernels.moe.routing import routing_from_mask, routing_from_topk
from sparsetron.kernels.moe.token_rounding import round_expert_counts
from sparsetron.kernels.testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs a GPU or TRITON_INTERPRET=1")
TABLES = ("expert_offsets", "sorted_token", "pair_index", "dest_row", "token_offsets", "topk_counts", "moved_counts")

# (tokens, experts, k, tile): tile 0 / 1 = no rounding; T < 2 * tile leaves experts that cannot grow
CASES = [
    (37, 8, 2, 4),
    (300, 8, 2, 16),
    (203, 16, 4, 32),
    (97, 6, 1, 8),
    (90, 128, 8, 16),
    (45, 64, 3, 16),
    (130, 32, 8, 128),
    (50, 12, 5, 0),
    (61, 7, 3, 1),
]


def legacy_token_rounding_mask(select_score, topk_mask, tile_m):
    """The token rounding the router used before the fused path (float topk; its tie order is torch's)."""
    t = select_score.shape[0]
    counts = topk_mask.sum(0)
    delta = round_expert_counts(counts, tile_m, t) - counts
    k = min(tile_m, t)
    score, sel = select_score.float().t(), topk_mask.t()
    lowest_selected = torch.topk(torch.where(sel, -score, float("-inf")), k, dim=1).indices
    best_unselected = torch.topk(torch.where(sel, float("-inf"), score), k, dim=1).indices
    j = torch.arange(k, device=score.device)[None, :]
    mask = sel.clone()
    mask.scatter_(1, lowest_selected, mask.gather(1, lowest_selected) & (j >= (-delta)[:, None]))
    mask.scatter_(1, best_unselected, mask.gather(1, best_unselected) | (j < delta[:, None]))
    return mask.t()


def _scores(t, e, kind, gen):
    logits = torch.randn(t, e, generator=gen, device="cpu") * 2
    if kind == "fp32":
        return logits.softmax(-1)
    if kind == "bf16":  # bf16 softmax: only ~256 values per octave, so equal scores are common
        return logits.softmax(-1).bfloat16()
    # "ties": aux-free-like select scores (probability + signed bias) from a handful of values, -0.0 included
    vals = torch.tensor([-0.5, -0.0, 0.0, 0.25, 0.25, 0.5, 1.0], device="cpu")
    return vals[torch.randint(0, len(vals), (t, e), generator=gen, device="cpu")]


def _case(t, e, k, kind, seed):
    gen = torch.Generator("cpu").manual_seed(seed)
    select = _scores(t, e, kind, gen)
    # distinct experts per token whatever the ties: topk of the score plus a tiny index-free jitter
    idx = (select.float() + torch.rand(t, e, generator=gen, device="cpu") * 1e-3).topk(k, -1).indices
    return select.to(DEVICE), idx.to(DEVICE)


def _tables(tab):
    return {n: getattr(tab, n) for n in TABLES}


@needs_triton
@pytest.mark.parametrize("kind", ["fp32", "bf16", "ties"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-tile{c[3]}" for c in CASES])
def test_triton_tables_equal_reference(case, kind):
    t, e, k, tile = case
    select, idx = _case(t, e, k, kind, seed=hash((case, kind)) % 2**31)
    got = route_tokens(select, idx, tile, "triton")
    ref = route_tokens(select, idx, tile, "torch")
    a_max = max_assignments(t, k, e, tile)
    assert got.sorted_token.shape == (a_max,) and got.padded == (tile > 1)
    for name, want in _tables(ref).items():
        assert torch.equal(getattr(got, name), want), (name, getattr(got, name).tolist(), want.tolist())
    counts = got.counts
    delta = counts - got.topk_counts
    assert got.moved_counts.tolist() == [int((-delta).clamp_min(0).sum()), int(delta.clamp_min(0).sum())]
    if tile > 1:
        assert (counts % tile == 0).all()
        assert int(counts.sum()) <= a_max
        assert torch.equal(got.row_valid, ref.row_valid) and int(got.row_valid.sum()) == int(counts.sum())
    else:
        assert got.row_valid is None and ref.row_valid is None
        assert torch.equal(counts, got.topk_counts) and int(counts.sum()) == t * k


LEGACY_CASES = [c for c in CASES if 1 < c[3] and c[1] <= 64]  # E=128 is covered above; the interpreter is slow there


@needs_triton
@pytest.mark.parametrize("case", LEGACY_CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-tile{c[3]}" for c in LEGACY_CASES])
def test_rounding_matches_legacy_implementation(case):
    """fp32 scores without ties: the same assignments as the float-topk rounding the router had; bf16
    scores (ties): the same counts, and per expert the same scores moved (only the tie order may differ,
    which the legacy code left to torch.topk)."""
    t, e, k, tile = case
    for kind in ("fp32", "bf16"):
        select, idx = _case(t, e, k, kind, seed=t * e + k)
        tab = route_tokens(select, idx, tile, "triton")
        a = int(tab.expert_offsets[-1])
        mask = torch.zeros(t, e, dtype=torch.bool, device=DEVICE)
        mask.view(-1)[tab.pair_index[:a]] = True
        topk_mask = torch.zeros(t, e, dtype=torch.bool, device=DEVICE).scatter_(1, idx, True)
        legacy = legacy_token_rounding_mask(select, topk_mask, tile)
        s = select.float()
        if kind == "fp32":
            assert s.t().sort(1).values.diff(dim=1).ne(0).all(), "fp32 case should be tie-free"
            assert torch.equal(mask, legacy)
        assert torch.equal(mask.sum(0), legacy.sum(0))
        for j in range(e):
            for moved_new, moved_old in ((topk_mask[:, j] & ~mask[:, j], topk_mask[:, j] & ~legacy[:, j]),
                                         (mask[:, j] & ~topk_mask[:, j], legacy[:, j] & ~topk_mask[:, j])):
                assert torch.equal(s[moved_new, j].sort().values, s[moved_old, j].sort().values)


@needs_triton
def test_all_tokens_tied_picks_by_token_index():
    """Every score equal: an expert drops its highest-index tokens and adds the lowest-index ones."""
    t, e, tile = 92, 4, 16
    select = torch.full((t, e), 0.25, device=DEVICE)
    idx = (torch.arange(t, device=DEVICE) % e)[:, None]  # 23 tokens each: remainders 7, round(28 / 16) = 2 go up
    tab = route_tokens(select, idx, tile, "triton")
    ref = route_tokens(select, idx, tile, "torch")
    for name, want in _tables(ref).items():
        assert torch.equal(getattr(tab, name), want), name
    assert tab.counts.tolist() == [32, 32, 16, 16]  # ties between experts: the lower index goes up
    rows = lambda j: tab.sorted_token[int(tab.expert_offsets[j]) : int(tab.expert_offsets[j + 1])].tolist()  # noqa: E731
    chose = [[i for i in range(t) if i % e == j] for j in range(e)]
    assert rows(2) == chose[2][:16] and rows(3) == chose[3][:16]  # the last 7 (highest indices) dropped
    added = sorted(set(rows(0)) - set(chose[0]))
    assert added == [i for i in range(t) if i % e != 0][:9]  # the 9 lowest-index tokens that had not chosen it


@needs_triton
@pytest.mark.parametrize("blocks", [RoutingBlocks(8, 16, 2, 8, 4, 1, 1, 1), RoutingBlocks(64, 64, 4, 32, 1, 1, 1, 1)],
                         ids=["radix2", "radix4"])
def test_block_shapes_do_not_change_the_result(blocks):
    select, idx = _case(211, 24, 4, "bf16", seed=5)
    got = route_tokens(select, idx, 32, "triton", blocks=blocks)
    ref = route_tokens(select, idx, 32, "torch")
    for name, want in _tables(ref).items():
        assert torch.equal(getattr(got, name), want), name


def _old_routing(scores, idx, tile, k):
    """The router's previous rounding path: mask + routing_from_mask with weights scores / denom."""
    topk_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    mask = legacy_token_rounding_mask(scores.detach(), topk_mask, tile)
    denom = scores.gather(1, idx).sum(-1, keepdim=True)
    return routing_from_mask(mask, scores / denom)


# Under the interpreter: 16-row expert tiles, so experts span several M-tiles.
SMALL = Blocks(16, 16, 16, 4, 1, 32, 16, 4, 1, 16, 32, 16, 4, 1) if interpreting() else None


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_plan_through_experts_matches_unpadded(dtype):
    """The padded plan (static size, garbage-free padding) gives the expert kernels' output and every
    gradient (x, both weights, router logits) of the compact plan the old path built."""
    t, d, f, e, k, tile = 53, 32, 24, 6, 2, 16
    gen = torch.Generator("cpu").manual_seed(11)
    x = torch.randn(t, d, generator=gen, device="cpu").to(DEVICE, dtype)
    w1 = (torch.randn(e, 2 * f, d, generator=gen, device="cpu") * d**-0.5).to(DEVICE, dtype)
    w2 = (torch.randn(e, d, f, generator=gen, device="cpu") * f**-0.5).to(DEVICE, dtype)
    logits = torch.randn(t, e, generator=gen, device="cpu").to(DEVICE)
    dout = torch.randn(t, d, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE)
    results = []
    for path in ("fused", "old"):
        leaves = [v.detach().clone().requires_grad_() for v in (x, w1, w2, logits)]
        scores = leaves[3].softmax(-1)
        idx = scores.detach().topk(k, -1).indices
        if path == "fused":
            denom = scores.gather(1, idx).sum(-1, keepdim=True)
            routing = route_tokens(scores.detach(), idx, tile).routing(scores, denom)
            assert routing.padded and routing.num_assignments == t * k + tile // 2
            assert (routing.sorted_weight[~routing.valid_rows()] == 0).all()
        else:
            routing = _old_routing(scores, idx, tile, k)
        out = moe_experts(leaves[0], leaves[1], leaves[2], routing, "triton", blocks=SMALL)
        grads = torch.autograd.grad((out.double() * dout).sum(), leaves)
        results.append((out,) + grads)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for name, a, b in zip(["out", "dx", "dw_gate_up", "dw_down", "dlogits"], *results):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@needs_triton
def test_plain_topk_plan_matches_argsort_plan():
    """tile_m = 0: the same experts, tokens and weights per expert as routing_from_topk (argsort); only
    the order of a token's k slots differs (ascending expert instead of top-k rank)."""
    select, idx = _case(77, 10, 3, "fp32", seed=3)
    scores = select.clone().requires_grad_()
    w = scores.gather(1, idx)
    fused = route_tokens(select, idx, 0).routing(scores, w.sum(-1, keepdim=True))
    plain = routing_from_topk(idx, w / w.sum(-1, keepdim=True), 10)
    assert fused.fixed_k == 3 and not fused.padded
    assert torch.equal(fused.expert_offsets, plain.expert_offsets)
    assert torch.equal(fused.sorted_token, plain.sorted_token)
    torch.testing.assert_close(fused.sorted_weight, plain.sorted_weight, rtol=0, atol=0)
    assert torch.equal(fused.token_offsets, plain.token_offsets)
    assert torch.equal(fused.dest_row.long() // 3, plain.dest_row.long() // 3)  # same token's slots


def test_bad_arguments_raise():
    s = torch.rand(6, 4)
    idx = torch.zeros(6, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="select"):
        route_tokens(s[0], idx)
    with pytest.raises(ValueError, match="topk_idx"):
        route_tokens(s, idx[:3])
    with pytest.raises(ValueError, match="topk_idx"):
        route_tokens(s, idx.float())
    with pytest.raises(ValueError, match="tile_m"):
        route_tokens(s, idx, -1)
    with pytest.raises(ValueError, match="implementation"):
        route_tokens(s, idx, 4, "cuda")
    with pytest.raises(ValueError, match="radix_bits"):
        RoutingBlocks(radix_bits=3)
    with pytest.raises(ValueError, match="chunk"):
        RoutingBlocks(chunk=1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
def test_no_host_sync_on_cuda():
    select, idx = _case(4096, 64, 8, "fp32", seed=1)
    scores = select.clone().requires_grad_()
    denom = scores.gather(1, idx).sum(-1, keepdim=True)
    route_tokens(select, idx, 128)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tab = route_tokens(select, idx, 128)
        routing = tab.routing(scores, denom)
        tab.moved()
        routing.tile_schedule(128)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (routing.counts % 128 == 0).all()
