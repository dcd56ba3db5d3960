"""nm_linear on CPU: the semi-structured path falls back to masked dense (one warning) and
matches it exactly; the packed-forward autograd function's dense backward is checked with the
masked weight standing in for the packing."""

import logging

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels.nm_sparse import is_2to4_subset, nm_linear, nm_mask, semi_structured_unavailable
from sparsetron.kernels.nm_sparse import semi_structured as ss


def _inputs(dtype, out=24, inp=32, bias=True):
    torch.manual_seed(0)
    w = torch.randn(out, inp, dtype=dtype, requires_grad=True)
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(2, 7, inp, dtype=dtype, requires_grad=True)
    return x, w, b, nm_mask(w, 2, 4)


@pytest.mark.cpu  # the CPU path's own fallback and its message
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["srste", "fixed"])
def test_cpu_fallback_equals_masked_dense(mode, dtype, caplog):
    ss._warned.clear()
    x, w, b, mask = _inputs(dtype)
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        y = nm_linear(x, w, mask, b, n=2, m=4, mode=mode)
        nm_linear(x, w, mask, b, n=2, m=4, mode=mode)
    warnings = [r for r in caplog.records if "semi-structured" in r.getMessage()]
    assert len(warnings) == 1 and "cpu" in warnings[0].getMessage()
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), gy)

    ref_w = w.detach().clone().requires_grad_()
    ref = F.linear(x, ref_w * mask, b)
    ref_grads = torch.autograd.grad(ref, (x, ref_w, b), gy)
    assert torch.equal(y, ref)
    for g, r in zip(grads[::2], ref_grads[::2]):  # x and bias: identical in both modes
        assert torch.equal(g, r)
    if mode == "fixed":
        assert torch.equal(grads[1], ref_grads[1])
    else:  # straight-through: pruned entries get the dense gradient too
        dense_gw = gy.reshape(-1, 24).t() @ x.detach().reshape(-1, 32)
        assert torch.allclose(grads[1].float(), dense_gw.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_function_backward(dtype, tol, bias):
    """SemiStructuredLinear's forward/backward math, with W~ itself as the 'packed' operand."""
    x, w, b, mask = _inputs(dtype, out=20, inp=12, bias=bias)
    w_masked = (w * mask).detach().requires_grad_()
    y = ss.SemiStructuredLinear.apply(x, w_masked, b, w_masked.detach())
    ref = F.linear(x, w_masked, b)
    inputs = (x, w_masked) + ((b,) if bias else ())
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, gy)
    exp = torch.autograd.grad(ref, inputs, gy)
    rel = lambda a, r: ((a.double() - r.double()).norm() / r.double().norm()).item()  # noqa: E731
    assert rel(y, ref) < tol
    for g, e in zip(got, exp):
        assert rel(g, e) < tol


def test_dense_backend_never_warns(caplog):
    ss._warned.clear()
    x, w, b, mask = _inputs(torch.float32)
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        nm_linear(x, w, mask, b, n=2, m=4, backend="dense")
    assert not caplog.records


def test_unavailable_reasons():
    cpu = torch.device("cpu")
    assert "CUDA" in semi_structured_unavailable(cpu, torch.bfloat16, (64, 64), 2, 4)
    assert [is_2to4_subset(n, m) for n, m in [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2), (3, 6)]] == [True, True, False, True, True, False]


def test_bad_backend_or_mode():
    x, w, b, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="backend"):
        nm_linear(x, w, mask, b, n=2, m=4, backend="cutlass")
    with pytest.raises(ValueError, match="mode"):
        nm_linear(x, w, mask, b, n=2, m=4, mode="soft")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_packed_forward_matches_masked_dense():
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    if semi_structured_unavailable(x.device, x.dtype, w.shape, 2, 4):
        pytest.skip("no 2:4 backend on this GPU")
    y = nm_linear(x, w, mask, n=2, m=4, mode="fixed")
    ref = F.linear(x.float(), (w * mask).float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rx, rw = torch.autograd.grad(F.linear(x, w * mask), (x, w), gy)
    assert ((gx.float() - rx.float()).norm() / rx.float().norm()).item() < 1e-2
    assert ((gw.float() - rw.float()).norm() / rw.float().norm()).item() < 1e-2


def test_auto_packs_only_weights_big_enough_to_gain():
    """backend auto skips the packed forward where cuSPARSELt's per-call cost exceeds the saving (measured
    7-30x slower at sides <= 2048 on an H200); backend packed forces it; the masked-dense result is the same."""
    from sparsetron.kernels.nm_sparse.semi_structured import MIN_PACKED_DIM, packing_pays

    assert packing_pays((MIN_PACKED_DIM, MIN_PACKED_DIM)) and packing_pays((14336, 4096))
    assert not packing_pays((768, 2048)) and not packing_pays((MIN_PACKED_DIM - 128, 8192))
    torch.manual_seed(0)
    w, x = torch.randn(16, 32), torch.randn(5, 32)
    mask = nm_mask(w, 2, 4)
    outs = [nm_linear(x, w, mask, None, n=2, m=4, backend=b) for b in ("auto", "packed", "dense")]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0])
