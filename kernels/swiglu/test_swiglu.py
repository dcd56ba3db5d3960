"""Fused SwiGLU vs the PyTorch reference: forward and both gradients, fp32/bf16, ragged sizes."""

import pytest
import torch

from sparsetron.kernels.swiglu import function as swiglu_function
from sparsetron.kernels.swiglu import swiglu, swiglu_reference
from sparsetron.kernels.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _on_device(device):  # kernels/conftest.py: the GPU if there is one, else the Triton interpreter
    yield


def _run(fn, gate, up, dy):
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = fn(g, u)
    return (y,) + torch.autograd.grad((y.float() * dy).sum(), (g, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 50), (2100,)])  # 1050 and 2100 elements: ragged last block
def test_matches_reference(dtype, shape):
    torch.manual_seed(0)
    gate, up = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape)
    got, want = _run(swiglu, gate, up, dy), _run(swiglu_reference, gate, up, dy)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype and torch.isfinite(g).all()
        assert rel_err(g, r) < TOL[dtype]


def test_fp32_against_fp64_truth_and_noncontiguous_input():
    torch.manual_seed(1)
    gate, up = torch.randn(40, 30).t(), torch.randn(30, 40) * 2  # gate is a transposed view
    dy = torch.randn(30, 40)
    got = _run(swiglu, gate, up, dy)
    truth = _run(swiglu_reference, gate.double(), up.double(), dy.double())
    for g, r in zip(got, truth):
        assert rel_err(g, r) < 1e-6


def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    up = torch.ones_like(gate)
    got = _run(swiglu, gate, up, torch.ones_like(gate))
    want = _run(swiglu_reference, gate, up, torch.ones_like(gate))
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_cpu_fallback_matches_triton_path(monkeypatch):
    torch.manual_seed(2)
    gate, up, dy = torch.randn(5, 33), torch.randn(5, 33), torch.randn(5, 33)
    triton_out = _run(swiglu, gate, up, dy)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fallback path must not launch Triton")

    monkeypatch.setattr(swiglu_function, "triton_usable", lambda *t: False)
    monkeypatch.setattr(swiglu_function.SwiGLUFunction, "apply", no_kernel)
    for a, b in zip(_run(swiglu, gate, up, dy), triton_out):
        assert rel_err(a, b) < 1e-6


def test_bad_input_raises():
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(4, 8), torch.randn(4, 9))
