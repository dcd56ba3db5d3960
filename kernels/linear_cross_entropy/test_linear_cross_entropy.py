"""Chunked linear + cross-entropy vs the materialising PyTorch reference: loss and the hidden and
weight gradients, fp32/bf16, ragged token counts and vocab sizes, ignored targets."""

import pytest
import torch

from sparsetron.kernels.linear_cross_entropy import function as lce_function
from sparsetron.kernels.linear_cross_entropy import kernel as lce_kernel
from sparsetron.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from sparsetron.kernels.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _on_device(device):  # kernels/conftest.py: the GPU if there is one, else the Triton interpreter
    yield


def _inputs(n, d, v, dtype, ignore_frac=0.2, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device="cpu")
    weight = torch.randn(v, d, generator=g, device="cpu") / d**0.5
    targets = torch.randint(0, v, (n,), generator=g, device="cpu")
    targets[torch.rand(n, generator=g, device="cpu") < ignore_frac] = -100
    dev = torch.get_default_device()
    return hidden.to(dev, dtype), weight.to(dev, dtype), targets.to(dev)


def _run(fn, hidden, weight, targets, grad_scale=1.0, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    dh, dw = torch.autograd.grad(loss * grad_scale, (h, w))
    return loss, dh, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n,d,v,chunk_size,block_v",
    [
        (37, 24, 300, 16, 128),  # ragged last token chunk; vocab 300 over tiles of 128
        (20, 16, 1000, None, None),  # default chunking and tiling
        (9, 8, 77, 4, 32),  # 9 tokens in chunks of 4, vocab 77 in tiles of 32
    ],
)
def test_matches_reference(monkeypatch, dtype, n, d, v, chunk_size, block_v):
    if block_v is not None:
        monkeypatch.setattr(lce_kernel, "default_block_v", lambda n_cols: block_v)
    hidden, weight, targets = _inputs(n, d, v, dtype)
    got = _run(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk_size)
    want = _run(linear_cross_entropy_reference, hidden, weight, targets)
    assert got[0].dtype == torch.float32
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape and torch.isfinite(g).all()
        assert rel_err(g, r) < TOL[dtype], (rel_err(g, r), TOL[dtype])


def test_fp32_against_fp64_truth_with_batched_input_and_grad_scale():
    """(B, S, D) hidden, a loss scale != 1 reaching the backward, and a custom ignore_index."""
    hidden, weight, targets = _inputs(2 * 11, 16, 130, torch.float32, seed=1)
    targets[targets == -100] = 5  # 5 is now a real class...
    targets[:3] = -1  # ...and -1 is the ignore index
    hidden3d, targets2d = hidden.view(2, 11, 16), targets.view(2, 11)
    got = _run(linear_cross_entropy, hidden3d, weight, targets2d, grad_scale=3.5, ignore_index=-1, chunk_size=8)
    truth = _run(linear_cross_entropy_reference, hidden3d.double(), weight.double(), targets2d, grad_scale=3.5, ignore_index=-1)
    assert got[1].shape == hidden3d.shape
    for g, r in zip(got, truth):
        assert rel_err(g, r) < 1e-5


def test_all_targets_ignored_matches_torch():
    hidden, weight, _ = _inputs(6, 8, 40, torch.float32)
    targets = torch.full((6,), -100)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    ref_loss, ref_dh, ref_dw = _run(linear_cross_entropy_reference, hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(ref_loss)  # torch's mean over zero targets
    assert torch.equal(dh, ref_dh) and torch.equal(dw, ref_dw)  # both all zero


def test_gradient_only_for_weight_and_no_grad():
    hidden, weight, targets = _inputs(13, 8, 50, torch.float32, seed=2)
    w = weight.clone().requires_grad_()
    (dw,) = torch.autograd.grad(linear_cross_entropy(hidden, w, targets, chunk_size=5), (w,))
    w_ref = weight.clone().requires_grad_()
    (dw_ref,) = torch.autograd.grad(linear_cross_entropy_reference(hidden, w_ref, targets), (w_ref,))
    assert rel_err(dw, dw_ref) < 1e-5
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert rel_err(loss, linear_cross_entropy_reference(hidden, weight, targets)) < 1e-6


def test_autocast_casts_like_f_linear(device):
    """fp32 master weights under bf16 autocast: bf16 logits, fp32 gradients back to the params."""
    hidden, weight, targets = _inputs(10, 16, 90, torch.float32, seed=3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = _run(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
        want = _run(linear_cross_entropy_reference, hidden, weight, targets)
    assert got[1].dtype == got[2].dtype == torch.float32
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-2


def test_cpu_fallback_matches_triton_path(monkeypatch):
    hidden, weight, targets = _inputs(12, 8, 60, torch.float32, seed=4)
    triton_out = _run(linear_cross_entropy, hidden, weight, targets, chunk_size=5)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fallback path must not launch Triton")

    monkeypatch.setattr(lce_function, "triton_usable", lambda *t: False)
    monkeypatch.setattr(lce_function.LinearCrossEntropyFunction, "apply", no_kernel)
    for a, b in zip(_run(linear_cross_entropy, hidden, weight, targets, chunk_size=5), triton_out):
        assert rel_err(a, b) < 1e-5


def test_default_chunk_size_bounds_logits_buffer():
    # Liger's rule: logits chunk ~ hidden size -> 2048 rows for 64K tokens, V=128K, D=4096
    assert lce_kernel.default_chunk_size(65536, 131072, 4096) == 2048
    assert lce_kernel.default_chunk_size(8192, 128256, 4096) == 1024  # floor: dW addmm stays compute-bound
    assert lce_kernel.default_chunk_size(10, 32000, 4096) == 16  # never far beyond N
    assert lce_kernel.default_chunk_size(0, 100, 8) >= 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.randn(10, 7)), "weight"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets must have shape"),
        (dict(targets=torch.full((4,), 10)), r"targets must be in \[0, 10\)"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "dtype"),
    ],
)
def test_bad_input_raises(kwargs, match):
    # CPU tensors: the target range is only checked where it costs no host sync
    args = dict(hidden=torch.randn(4, 8, device="cpu"), weight=torch.randn(10, 8, device="cpu"),
                targets=torch.zeros(4, dtype=torch.long, device="cpu"))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)
