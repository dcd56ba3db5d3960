"""Triton expert kernels vs the per-expert PyTorch loop: output and every gradient (x, both expert
weights, router logits through the routing weights), ragged shapes, empty experts, k=1 and k=8,
token-rounded routing, fp32 and bf16, against an fp64 reference."""

import pytest
import torch

from sparsetron.kernels._triton import interpreting
from sparsetron.kernels.moe.function import Blocks, moe_experts
from sparsetron.kernels.moe.token_rounding import token_rounding_mask
from sparsetron.kernels.moe.routing import routing_from_mask, routing_from_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs a GPU or TRITON_INTERPRET=1")


# Under the interpreter: 16-row tiles, so ragged experts span several M-, N- and K-tiles.
SMALL = Blocks(16, 16, 16, 4, 1, 32, 16, 4, 1, 16, 32, 16, 4, 1) if interpreting() else None


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(logits, k, rounding_tile):
    probs = logits.softmax(-1)
    idx = probs.detach().topk(k, -1).indices
    w = probs.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) if k > 1 else w
    if not rounding_tile:
        return routing_from_topk(idx, w, logits.shape[1])
    topk_mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    mask = token_rounding_mask(probs.detach(), topk_mask, rounding_tile)
    denom = probs.gather(1, idx).sum(-1, keepdim=True) if k > 1 else 1.0
    return routing_from_mask(mask, probs / denom)


def _run(x, w1, w2, logits, k, rounding_tile, dout, impl):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, logits)]
    routing = _routing(leaves[3], k, rounding_tile)
    out = moe_experts(leaves[0], leaves[1], leaves[2], routing, impl, blocks=SMALL)
    grads = torch.autograd.grad((out.double() * dout).sum(), leaves)
    return (out,) + grads, routing


# (tokens, dim, ffn, experts, k, empty experts, rounding tile)
CASES = [
    (37, 48, 40, 5, 2, (), 0),  # ragged everywhere
    (29, 32, 24, 6, 1, (), 0),  # k = 1 (no combine pass)
    (21, 40, 16, 10, 8, (), 0),  # k = 8
    (45, 32, 24, 8, 2, (0, 3, 7), 0),  # experts with zero tokens
    (50, 32, 24, 6, 2, (), 16),  # token-rounded routing: variable experts per token
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-D{c[1]}-F{c[2]}-E{c[3]}-k{c[4]}" + ("-empty" if c[5] else "") + ("-tr" if c[6] else "") for c in CASES])
def test_experts_match_reference(case, dtype):
    t, d, f, e, k, empty, tile = case
    gen = torch.Generator(torch.get_default_device()).manual_seed(hash(case) % 2**31)
    x = torch.randn(t, d, generator=gen)
    w1 = torch.randn(e, 2 * f, d, generator=gen) * d**-0.5
    w2 = torch.randn(e, d, f, generator=gen) * f**-0.5
    logits = torch.randn(t, e, generator=gen)
    if empty:
        logits[:, list(empty)] = -30.0
    dout = torch.randn(t, d, generator=gen, dtype=torch.float64)
    x, w1, w2 = (v.to(DEVICE, dtype) for v in (x, w1, w2))
    logits, dout = logits.to(DEVICE), dout.to(DEVICE)

    got, routing = _run(x, w1, w2, logits, k, tile, dout, "triton")
    if empty:
        assert (routing.counts[list(empty)] == 0).all()
    # oracle: the same loop in fp64 from the same (rounded) inputs
    exact, _ = _run(x.double(), w1.double(), w2.double(), logits.double(), k, tile, dout, "torch")
    names = ["out", "dx", "dw_gate_up", "dw_down", "dlogits"]
    if dtype == torch.float32:
        tol = 1e-5 if interpreting() else 5e-3  # interpreter dots are exact fp32; GPU uses tf32
        for name, a, b in zip(names, got, exact):
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < tol, (name, rel_err(a, b))
    else:
        # bf16: within 1e-2 of exact and no worse than the bf16 PyTorch loop (same rounding points)
        loop, _ = _run(x, w1, w2, logits, k, tile, dout, "torch")
        for name, a, ref, b in zip(names, got, loop, exact):
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))
            assert rel_err(a, b) < 2 * rel_err(ref, b) + 1e-3, (name, rel_err(a, b), rel_err(ref, b))


def test_bad_shapes_raise():
    x = torch.randn(4, 8, device=DEVICE)
    r = routing_from_topk(torch.zeros(4, 1, dtype=torch.long, device=DEVICE), torch.ones(4, 1, device=DEVICE), 2)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, torch.randn(2, 6, 8, device=DEVICE), torch.randn(2, 8, 4, device=DEVICE), r)
    with pytest.raises(ValueError, match="implementation"):
        moe_experts(x, torch.randn(2, 8, 8, device=DEVICE), torch.randn(2, 8, 4, device=DEVICE), r, "cuda")
