"""SR-STE masked weight: forward is W*M; gradient is the straight-through one plus lambda*(1-M)*W."""

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels.nm_sparse import fixed_masked_weight, nm_mask, srste_grad_reference, srste_masked_weight


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
def test_srste_linear_gradient_equals_formula(decay, dtype, tol):
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    y = F.linear(x, srste_masked_weight(w, mask, decay))
    gy = torch.randn_like(y)
    y.backward(gy)

    # hand formula in float64: y = x W~^T, dL/dW~ = gy^T x, dL/dx = gy W~
    w64, x64, gy64, m64 = w.detach().double(), x.detach().double(), gy.double(), mask.double()
    assert torch.allclose(y.double(), x64 @ (w64 * m64).t(), rtol=tol, atol=tol)
    g_masked = gy64.reshape(-1, 12).t() @ x64.reshape(-1, 16)
    expected_w = g_masked + decay * (1 - m64) * w64
    expected_x = gy64 @ (w64 * m64)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(w.grad, expected_w) < tol
    assert rel(x.grad, expected_x) < tol
    # the reference helper says the same
    assert rel(w.grad, srste_grad_reference(g_masked, w64, mask, decay)) < tol
    # straight-through: pruned weights get a gradient (they can come back)
    assert w.grad[~mask].abs().sum() > 0


def test_fixed_mask_gradient_is_masked():
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    (fixed_masked_weight(w, mask) * torch.randn(8, 8)).sum().backward()
    assert (w.grad[~mask] == 0).all() and (w.grad[mask] != 0).all()


def test_bad_mask_or_decay():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="mask"):
        srste_masked_weight(w, torch.ones(4, 4), 0.1)
    with pytest.raises(ValueError, match="decay"):
        srste_masked_weight(w, torch.ones(4, 4, dtype=torch.bool), -1.0)
