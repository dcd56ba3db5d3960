"""Fused RoPE vs the PyTorch reference: forward and gradients, fp32/bf16, strided inputs, GQA."""

import pytest
import torch

from sparsetron.kernels.rope import apply_rope, apply_rope_qk, apply_rope_reference
from sparsetron.kernels.rope import function as rope_function
from sparsetron.kernels.rope import kernel as rope_kernel
from sparsetron.train.model.rope import apply_rope as model_apply_rope
from sparsetron.train.model.rope import rope_tables
from sparsetron.kernels.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _on_device(device):  # kernels/conftest.py: the GPU if there is one, else the Triton interpreter
    yield


def _qkv_views(b, s, hq, hk, d, dtype):
    """q, k as strided views of one fused projection output, as a fused-QKV model would give."""
    fused = torch.randn(b, s, (hq + 2 * hk) * d, dtype=dtype)
    q = fused[..., : hq * d].view(b, s, hq, d)
    k = fused[..., hq * d : (hq + hk) * d].view(b, s, hk, d)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,s,hq,hk,d", [(2, 5, 4, 2, 16), (1, 7, 3, 3, 12)])  # D/2=6: not a power of two
def test_qk_matches_reference(dtype, b, s, hq, hk, d):
    torch.manual_seed(0)
    q, k = _qkv_views(b, s, hq, hk, d, dtype)
    cos, sin = rope_tables(d, 16, 10000.0)
    cos, sin = cos[:s], sin[:s]
    dq, dk = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)

    def run(fn):
        qq, kk = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        q_rot, k_rot = fn(qq, kk)
        grads = torch.autograd.grad((q_rot.float() * dq).sum() + (k_rot.float() * dk).sum(), (qq, kk))
        return (q_rot, k_rot) + grads

    got_pair = run(lambda qq, kk: apply_rope_qk(qq, kk, cos, sin))
    got_single = run(lambda qq, kk: (apply_rope(qq, cos, sin), apply_rope(kk, cos, sin)))
    want = run(lambda qq, kk: (apply_rope_reference(qq, cos, sin), apply_rope_reference(kk, cos, sin)))
    for got in (got_pair, got_single):
        for g, r in zip(got, want):
            assert g.shape == r.shape and g.dtype == r.dtype and torch.isfinite(g).all()
            assert rel_err(g, r) < TOL[dtype]


def test_strided_input_matches_model():
    """A transposed (B, H, S, D) -> (B, S, H, D) view: non-unit head and sequence strides."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 8).transpose(1, 2)  # (B=2, S=6, H=3, D=8)
    cos, sin = rope_tables(8, 6, 500.0)
    got = apply_rope(x, cos, sin)
    assert got.is_contiguous()
    assert rel_err(got, model_apply_rope(x, cos, sin)) < 1e-6


def test_many_heads_loop_over_head_tiles(monkeypatch):
    """More heads than one tile: the in-kernel loop over head tiles (with a ragged last tile)."""
    torch.manual_seed(2)
    monkeypatch.setattr(rope_kernel, "_head_block", lambda n_heads, block_half: 4)
    x = torch.randn(1, 3, 10, 8, requires_grad=True)
    cos, sin = rope_tables(8, 3, 10000.0)
    dy = torch.randn(1, 3, 10, 8)
    got = apply_rope(x, cos, sin)
    (gx,) = torch.autograd.grad((got * dy).sum(), x)
    want = apply_rope_reference(x, cos, sin)
    (wx,) = torch.autograd.grad((want * dy).sum(), x)
    assert rel_err(got, want) < 1e-6 and rel_err(gx, wx) < 1e-6


def test_cpu_fallback_matches_triton_path(monkeypatch):
    torch.manual_seed(3)
    q, k = _qkv_views(1, 4, 2, 1, 8, torch.float32)
    cos, sin = rope_tables(8, 4, 10000.0)
    triton_q, triton_k = apply_rope_qk(q, k, cos, sin)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fallback path must not launch Triton")

    monkeypatch.setattr(rope_function, "triton_usable", lambda *t: False)
    monkeypatch.setattr(rope_function.RoPEFunction, "apply", no_kernel)
    fb_q, fb_k = apply_rope_qk(q, k, cos, sin)
    assert rel_err(fb_q, triton_q) < 1e-6 and rel_err(fb_k, triton_k) < 1e-6
    assert rel_err(apply_rope(q, cos, sin), triton_q) < 1e-6


@pytest.mark.parametrize(
    "x_shape,table_shape,match",
    [((1, 4, 2, 7), (4, 3), "even D"), ((1, 4, 2, 8), (5, 4), "cos"), ((4, 2, 8), (4, 4), r"\(B, S, H, D\)")],
)
def test_bad_input_raises(x_shape, table_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(torch.randn(x_shape), torch.randn(table_shape), torch.randn(table_shape))
