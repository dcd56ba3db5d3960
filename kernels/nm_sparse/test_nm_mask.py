"""nm_mask: Triton kernel (interpreter on CPU) against the sort-based reference."""

import pytest
import torch

from sparsetron.kernels.nm_sparse import nm_mask, nm_mask_reference

PATTERNS = [(2, 4), (1, 4), (4, 8), (3, 6), (2, 2), (5, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,groups", [(1, 1), (37, 11), (130, 9)])  # ragged: groups not a block multiple
def test_kernel_matches_reference(n, m, rows, groups, dtype):
    torch.manual_seed(rows * 100 + m)
    w = torch.randn(rows, m * groups, dtype=dtype)
    mask = nm_mask(w, n, m, use_triton=True)
    ref = nm_mask_reference(w.abs(), n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, ref)
    assert (mask.view(-1, m).sum(-1) == n).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_ties_go_to_lower_index(n, m):
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (64, m * 5)).float()  # many ties
    mask = nm_mask(scores, n, m, scores=scores, use_triton=True)
    assert torch.equal(mask, nm_mask_reference(scores, n, m))
    # all-equal group: the first n positions win
    flat = nm_mask(torch.ones(1, m), n, m, use_triton=True)
    assert flat[0, :n].all() and not flat[0, n:].any()


def test_kept_entries_are_the_largest():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    mask = nm_mask(w, 2, 4)
    g, k = w.abs().view(-1, 4), mask.view(-1, 4)
    kept_min = torch.where(k, g, torch.inf).min(-1).values
    dropped_max = torch.where(~k, g, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_scores_override_magnitude():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert nm_mask(w, 2, 4, scores=scores).tolist() == [[False, False, True, True]]


def test_bad_arguments():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="m must be"):
        nm_mask(w, 1, 1)
    with pytest.raises(ValueError, match="n must be"):
        nm_mask(w, 5, 4)
    with pytest.raises(ValueError, match="divisible by m"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="scores"):
        nm_mask(w, 2, 4, scores=torch.randn(4, 4))
