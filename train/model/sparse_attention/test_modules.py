"""NSA / MoBA / sliding-window modules: block selection against brute force, Triton path against
the all-PyTorch reference path (outputs and every gradient), registry wiring, and a tiny Llama
with each kind learning a repeated pattern."""

import copy

import pytest
import torch

from sparsetron.configs.schema.attention import AttentionConfig
from sparsetron.configs.schema.model import ModelConfig
from sparsetron.kernels.sparse_attention.function import sparse_attention_core
from sparsetron.kernels.sparse_attention.reference import block_lists_to_mask, reference_block_sparse_attention
from sparsetron.kernels.sparse_attention.selection import (
    cmp_scores,
    cmp_scores_reference,
    compressed_block_lists,
    moba_select,
    nsa_select,
)
from sparsetron.train.model import Llama, get_attention
from sparsetron.train.model.sparse_attention.moba import MoBAAttention, SlidingWindowAttention
from sparsetron.train.model.sparse_attention.nsa import NSAAttention
from sparsetron.train.model.rope import rope_tables


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_compressed_lists_cover_exactly_the_visible_keys():
    s, block, stride, cb = 150, 16, 4, 8
    n_cmp = (s - cb) // stride + 1
    idx, cnt = compressed_block_lists(s, n_cmp, block, stride, cb)
    mask = block_lists_to_mask(idx, cnt, block, s, n_cmp, key_stride=stride, key_offset=cb - 1)[0, 0]
    t, c = torch.arange(s)[:, None], torch.arange(n_cmp)[None, :]
    assert torch.equal(mask, c * stride + cb - 1 <= t)


def test_cmp_scores_kernel_matches_dense():
    gen = torch.Generator(torch.get_default_device()).manual_seed(10)
    b, hq, hkv, s, d, block, stride, cb = 2, 4, 2, 90, 32, 16, 4, 8
    n_cmp = (s - cb) // stride + 1
    q = torch.randn(b, hq, s, d, generator=gen)
    kc, vc = torch.randn(b, hkv, n_cmp, d, generator=gen), torch.randn(b, hkv, n_cmp, d, generator=gen)
    idx, cnt = compressed_block_lists(s, n_cmp, block, stride, cb)
    _, lse = reference_block_sparse_attention(q, kc, vc, idx.expand(b, hkv, -1, -1), cnt.expand(b, hkv, -1), block,
                                              key_stride=stride, key_offset=cb - 1)
    got = cmp_scores(q, kc, lse, block, stride, cb, d ** -0.5)
    want = cmp_scores_reference(q.double(), kc.double(), lse.double(), block, stride, cb, d ** -0.5)
    assert got.shape == (b, hkv, -(-s // block), n_cmp)
    assert rel(got, want) < 1e-5
    # probabilities of each query row sum to 1 over its visible keys: block sums count its rows
    rows_with_keys = (torch.arange(s) >= cb - 1).float().view(1, -1)
    per_block = torch.nn.functional.pad(rows_with_keys, (0, 6)).view(-1, block).sum(-1) * (hq // hkv)
    assert torch.allclose(got.sum(-1), per_block.expand_as(got.sum(-1)), rtol=1e-5)


def test_nsa_select_forced_causal_and_topn():
    gen = torch.Generator(torch.get_default_device()).manual_seed(11)
    nqb, n_cmp, block, stride, cb, n_sel = 9, 33, 16, 4, 8, 4
    imp = torch.rand(2, 3, nqb, n_cmp, generator=gen)
    idx, cnt = nsa_select(imp, nqb * block, block, stride, cb, n_sel)
    from sparsetron.kernels.sparse_attention.selection import cmp_to_select_weights

    sel_scores = imp @ cmp_to_select_weights(n_cmp, nqb, stride, cb, block)
    for z in range(2):
        for h in range(3):
            for i in range(nqb):
                got = idx[z, h, i, : cnt[z, h, i]].tolist()
                assert cnt[z, h, i] == min(n_sel, i + 1)
                assert got == sorted(set(got)) and max(got) <= i
                forced = {0, i, max(i - 1, 0)}
                assert forced <= set(got)
                rest = [j for j in range(i + 1) if j not in forced]
                want = sorted(rest, key=lambda j: -sel_scores[z, h, i, j].item())[: cnt[z, h, i] - len(forced)]
                assert set(got) == forced | set(want)


def test_moba_select_matches_brute_force():
    gen = torch.Generator(torch.get_default_device()).manual_seed(12)
    b, hq, hkv, s, d, block, top_k = 1, 4, 2, 75, 16, 16, 2
    q, k = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = moba_select(q, k, block, top_k)
    nb = -(-s // block)
    for h in range(hkv):
        kmean = [k[0, h, j * block:(j + 1) * block].mean(0) for j in range(nb)]
        for i in range(nb):
            qmean = q[0, 2 * h:2 * h + 2, i * block:(i + 1) * block].reshape(-1, d).mean(0)
            past = sorted(range(i), key=lambda j: -(qmean @ kmean[j]).item())[:top_k]
            assert idx[0, h, i, : cnt[0, h, i]].tolist() == sorted(past + [i])


def small_cfg(**attn):
    model = ModelConfig(dim=128, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=64, ffn_dim=128, max_seq_len=160)
    return model, AttentionConfig(**attn)


NSA_ATTN = dict(kind="nsa", block_size=16, window=24, compress_block=8, compress_stride=4, select_block=16, num_selected=3)


def compare_paths(module, s=75, dtype=torch.float32, tol=2e-5):
    """Same module weights, Triton path vs pure-PyTorch path: output and every gradient."""
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    ref = copy.deepcopy(module)
    ref.use_reference = True
    cos, sin = rope_tables(module.head_dim, s, 10000.0)
    x = torch.randn(2, s, 128)
    outs, grads = [], []
    for m in (module, ref):
        m.to(dtype)
        xi = x.to(dtype).requires_grad_()
        out = m(xi, cos, sin)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert not torch.isnan(outs[0]).any()
    assert rel(outs[0], outs[1]) < tol, rel(outs[0], outs[1])
    for g, r in zip(grads[0], grads[1]):
        assert rel(g, r) < 10 * tol, rel(g, r)


@pytest.mark.parametrize("compress_kind", ["mean", "learned"])
def test_nsa_module_matches_reference(compress_kind):
    model, attn = small_cfg(**NSA_ATTN, compress_kind=compress_kind)
    m = NSAAttention(model, attn, 0)
    compare_paths(m)
    # the selected lists follow the rules on real activations
    q = torch.randn(1, 4, 75, 32)
    *_, idx, cnt = m.branches(q, torch.randn(1, 2, 75, 32), torch.randn(1, 2, 75, 32))
    assert (cnt == torch.clamp(torch.arange(5) + 1, max=3)).all()


def test_nsa_module_bf16():
    model, attn = small_cfg(**NSA_ATTN)
    compare_paths(NSAAttention(model, attn, 0), dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("block", [16, 32])
def test_moba_module_matches_reference(block):
    model, attn = small_cfg(kind="moba", moba_block=block, moba_top_k=2)
    compare_paths(MoBAAttention(model, attn, 0), s=100)


def test_sliding_window_module_matches_reference_and_sdpa():
    model, attn = small_cfg(kind="sliding_window", block_size=16, window=30)
    m = SlidingWindowAttention(model, attn, 0)
    compare_paths(m)
    # against SDPA with an explicit window mask
    q, k, v = torch.randn(1, 4, 70, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)
    t = torch.arange(70)
    mask = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 30)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    assert rel(m.attend(q, k, v), want) < 2e-5


def test_registry_and_config_errors():
    model, attn = small_cfg(**NSA_ATTN)
    for kind, cls in (("nsa", NSAAttention), ("moba", MoBAAttention), ("sliding_window", SlidingWindowAttention)):
        assert isinstance(get_attention(kind)(model, attn, 0), cls)
    with pytest.raises(ValueError, match="compress_kind"):
        NSAAttention(model, AttentionConfig(compress_kind="conv"), 0)
    with pytest.raises(ValueError, match="moba_block"):
        MoBAAttention(model, AttentionConfig(moba_block=48), 0)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(model, AttentionConfig(window=0), 0)


def test_cpu_fallback_without_triton(monkeypatch):
    """Plain CPU without the interpreter goes through the reference, same numbers."""
    import sparsetron.kernels.sparse_attention.function as fn

    gen = torch.Generator(torch.get_default_device()).manual_seed(13)
    q, k, v = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 1, 40, 16, generator=gen), torch.randn(1, 1, 40, 16, generator=gen)
    idx = torch.arange(3, dtype=torch.int32).view(1, 1, 3, 1)
    tri, _ = sparse_attention_core(q, k, v, idx, None, 16)
    monkeypatch.setattr(fn, "triton_usable", lambda *t: False)
    ref, _ = sparse_attention_core(q, k, v, idx, None, 16)
    assert rel(tri, ref) < 2e-5


TRAIN_ATTN = {
    "nsa": dict(NSA_ATTN),
    "moba": dict(kind="moba", moba_block=16, moba_top_k=2),
    "sliding_window": dict(kind="sliding_window", block_size=16, window=32),
}


@pytest.mark.parametrize("kind", sorted(TRAIN_ATTN))
def test_tiny_llama_trains(kind):
    torch.manual_seed(0)
    model_cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=32, ffn_dim=128, max_seq_len=64)
    model = Llama(model_cfg, AttentionConfig(**TRAIN_ATTN[kind]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    period = torch.randint(0, 32, (1, 8))
    tokens = period.repeat(1, 8)  # (1, 64): a repeated 8-token pattern
    losses = []
    for _ in range(10):  # few steps: every one runs the Triton kernels through the interpreter
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses
