"""Fused RMSNorm vs the PyTorch reference: forward and every gradient, fp32/bf16, ragged sizes."""

import pytest
import torch

from sparsetron.kernels.rmsnorm import function as rms_function
from sparsetron.kernels.rmsnorm import rms_norm, rms_norm_reference
from sparsetron.train.model.norm import RMSNorm
from sparsetron.kernels.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _on_device(device):  # kernels/conftest.py: the GPU if there is one, else the Triton interpreter
    yield


def _run(fn, x, w, residual, dy, dh):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    inputs = [x, w]
    if residual is None:
        y = fn(x, w, 1e-5)
        loss = (y.float() * dy).sum()
    else:
        residual = residual.clone().requires_grad_()
        inputs.append(residual)
        y, h = fn(x, w, 1e-5, residual=residual)
        # h feeds the next residual in the model, so give it a gradient too
        loss = (y.float() * dy).sum() + (h.float() * dh).sum()
    grads = torch.autograd.grad(loss, inputs)
    return (y,) + ((h,) if residual is not None else ()) + grads


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 5, 32), (7, 48)])  # 15 and 7 rows; D=48 is not a power of two
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(dtype, w_dtype, shape, with_residual):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(shape[-1])).to(w_dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    out_dtype = torch.promote_types(dtype, w_dtype)
    dy = torch.randn(shape, dtype=out_dtype).float()
    dh = torch.randn(shape).float()
    got = _run(rms_norm, x, w, residual, dy, dh)
    want = _run(rms_norm_reference, x, w, residual, dy, dh)
    tol = TOL[dtype]
    assert got[0].dtype == want[0].dtype == out_dtype
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < tol, (rel_err(g, r), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_model_module(dtype):
    torch.manual_seed(1)
    module = RMSNorm(40, eps=1e-6)
    with torch.no_grad():
        module.weight.mul_(torch.rand(40) + 0.5)
    x = torch.randn(2, 9, 40, dtype=dtype)
    got = rms_norm(x, module.weight, module.eps)
    want = module(x)
    assert got.dtype == want.dtype == torch.float32  # fp32 weight promotes, as in the module
    assert rel_err(got, want) < TOL[dtype]


def test_mixed_dtype_residual_like_autocast_model():
    """bf16 block output + fp32 residual stream + fp32 weight: h and y are fp32, dx comes back bf16."""
    torch.manual_seed(4)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    residual, w = torch.randn(6, 40), torch.rand(40) + 0.5
    dy, dh = torch.randn(6, 40), torch.randn(6, 40)
    got = _run(rms_norm, x, w, residual, dy, dh)
    want = _run(rms_norm_reference, x, w, residual, dy, dh)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32] * 2 + [torch.bfloat16] + [torch.float32] * 2  # y, h, dx, dw, dres
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-2 if g.dtype == torch.bfloat16 else rel_err(g, r) < 1e-5


def test_fp32_against_fp64_truth():
    torch.manual_seed(2)
    x, w = torch.randn(11, 72), torch.randn(72)
    got = rms_norm(x, w, 1e-5)
    xd = x.double()
    truth = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(got, truth) < 1e-6


def test_cpu_fallback_matches_triton_path(monkeypatch):
    torch.manual_seed(3)
    x, w, r = torch.randn(5, 24), torch.rand(24) + 0.5, torch.randn(5, 24)
    dy = torch.randn(5, 24)
    triton_out = _run(rms_norm, x, w, r, dy, dy)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fallback path must not launch Triton")

    monkeypatch.setattr(rms_function, "triton_usable", lambda *t: False)
    monkeypatch.setattr(rms_function.RMSNormFunction, "apply", no_kernel)
    fallback_out = _run(rms_norm, x, w, r, dy, dy)
    for a, b in zip(fallback_out, triton_out):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(4, 8), weight=torch.ones(7)), "weight"),
        (dict(x=torch.randn(4, 8), weight=torch.ones(8), eps=-1.0), "eps"),
        (dict(x=torch.randn(4, 8), weight=torch.ones(8), residual=torch.randn(4, 9)), "residual"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(**kwargs)
