"""Block-sparse core (Triton; interpreter on CPU) against the dense-mask reference in fp64:
output, LSE, dQ, dK, dV; fp32 and bf16; ragged lengths, GQA 1/4/8, head dim 64/128, packed
sequences, windows, empty rows, both backward modes; head packing (HEADS_PER_PROGRAM 2 and 4) on a
few representative shapes; the index-prefetch loops (IDX_PREFETCH) against the reference and bit for
bit against the default loops."""

import pytest
import torch

from sparsetron.kernels.sparse_attention import function as fn
from sparsetron.kernels.sparse_attention.function import (
    block_sparse_attention,
    reverse_block_index,
    sparse_attention_core,
)
from sparsetron.kernels.sparse_attention.reference import block_lists_to_mask, reference_block_sparse_attention
from sparsetron.kernels.sparse_attention.selection import window_block_lists

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2)}  # (out/lse, grads)


def random_lists(z, h, nqb, maxsel, gen, with_diagonal=True, nkb=None):
    """Distinct causal KV blocks per query block (random subset), optionally forcing the diagonal."""
    nkb = nqb if nkb is None else nkb
    scores = torch.rand(z, h, nqb, nkb, generator=gen)
    i = torch.arange(nqb)[:, None]
    j = torch.arange(nkb)[None, :]
    scores = scores.masked_fill(j > i, -1.0)
    if with_diagonal:
        scores = scores.masked_fill(j == i, 2.0)
    k = min(maxsel, nkb)
    top = scores.topk(k, dim=-1)
    count = (top.values >= 0).sum(-1)
    if not with_diagonal:  # some rows shorter (or empty) on purpose
        count = torch.minimum(count, torch.randint(0, k + 1, count.shape, generator=gen))
    idx = torch.where(torch.arange(k) < count[..., None], top.indices, 0)
    return idx.to(torch.int32), count.to(torch.int32)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_reference(q, k, v, idx, cnt, block, dtype, deterministic=False, cu=None, window=None, key_stride=1, key_offset=0,
                            atomic_dq=False):
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention_core(q, k, v, idx, cnt, block, cu_seqlens_q=cu, window=window,
                                     key_stride=key_stride, key_offset=key_offset, deterministic=deterministic,
                                     atomic_dq=atomic_dq)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_block_sparse_attention(q64, k64, v64, idx, cnt, block, cu, None, window, None,
                                                    key_stride, key_offset)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tol_o, tol_g = TOL[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()
    assert rel(out, ref) < tol_o, rel(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel(lse[finite], ref_lse[finite]) < tol_o
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel(g, r) < tol_g, (name, rel(g, r))
    return out, grads


CASES = [
    # batch, q heads, kv heads, seq, head dim, block, max selected
    (2, 4, 4, 100, 64, 16, 3),  # GQA 1, ragged
    (1, 8, 2, 131, 64, 32, 3),  # GQA 4
    (1, 8, 1, 96, 128, 32, 2),  # GQA 8, head dim 128
    (1, 2, 1, 150, 64, 64, 2),  # the production block size, ragged
    (1, 2, 2, 200, 64, 128, 2),  # block 128, ragged
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_hq{}_hkv{}_s{}_d{}_blk{}_sel{}".format(*c))
def test_core_matches_reference(case, dtype):
    b, hq, hkv, s, d, block, maxsel = case
    gen = torch.Generator(torch.get_default_device()).manual_seed(hash(case) % 1000)
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), maxsel, gen)
    check_against_reference(q, k, v, idx, cnt, block, dtype)


def test_deterministic_backward_is_bitwise_reproducible_and_matches():
    gen = torch.Generator(torch.get_default_device()).manual_seed(1)
    b, hq, hkv, s, d, block = 1, 4, 1, 90, 64, 16
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), 4, gen)
    torch.manual_seed(0)
    _, g1 = check_against_reference(q, k, v, idx, cnt, block, torch.float32, deterministic=True)
    torch.manual_seed(0)
    _, g2 = check_against_reference(q, k, v, idx, cnt, block, torch.float32, deterministic=True)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_atomic_dq_variant(dtype):
    """The opt-in backward that adds dQ with atomics from the dK/dV pass."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(7)
    b, hq, hkv, s, d, block = 1, 8, 2, 110, 64, 16
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), 3, gen)
    check_against_reference(q, k, v, idx, cnt, block, dtype, atomic_dq=True)
    with pytest.raises(ValueError, match="atomic_dq"):
        sparse_attention_core(q, k, v, idx, cnt, block, deterministic=True, atomic_dq=True)


def test_empty_rows_and_short_lists():
    """Lists without the diagonal, some empty: those rows give 0 output, -inf LSE, no NaN."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(2)
    b, hq, hkv, s, d, block = 1, 2, 2, 80, 64, 16
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), 3, gen, with_diagonal=False)
    cnt[0, 0, 2] = 0  # a whole query block with no key
    out, _ = check_against_reference(q, k, v, idx, cnt, block, torch.float32)
    empty = block_lists_to_mask(idx, cnt, block, s, s).sum(-1) == 0  # (b, hkv, s)
    assert (out.detach().abs().sum(-1)[empty.repeat_interleave(hq // hkv, 1)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_varlen(dtype):
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)
    lens = [37, 80, 16, 61]
    hq, hkv, d, block = 4, 2, 64, 16
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = torch.randn(1, hq, total, d, generator=gen), torch.randn(1, hkv, total, d, generator=gen), torch.randn(1, hkv, total, d, generator=gen)
    nqb = -(-max(lens) // block)
    idx, cnt = random_lists(len(lens), hkv, nqb, 3, gen)
    # blocks past a sequence's end must not be listed: clip each sequence's lists
    for z, n in enumerate(lens):
        nb = -(-n // block)
        cnt[z, :, nb:] = 0
    check_against_reference(q, k, v, idx, cnt, block, dtype, cu=cu)


def test_window_and_compressed_key_positions():
    """Token-exact window mask, and keys placed at n*stride+offset (NSA's compressed keys)."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(4)
    b, hq, hkv, s, d, block, window = 1, 4, 2, 120, 64, 16, 40
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = window_block_lists(s, block, window)
    idx, cnt = idx.expand(b, hkv, -1, -1), cnt.expand(b, hkv, -1)
    check_against_reference(q, k, v, idx, cnt, block, torch.float32, window=window)
    # the lists + window give exactly the sliding-window causal mask
    mask = block_lists_to_mask(idx, cnt, block, s, s, window=window)[0, 0]
    t = torch.arange(s)
    assert torch.equal(mask, (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window))
    # compressed keys: 13 keys, key n at position 8n + 15
    kc, vc = torch.randn(b, hkv, 13, d, generator=gen), torch.randn(b, hkv, 13, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), 1, gen, nkb=1)
    cnt.fill_(1)
    check_against_reference(q, kc, vc, idx, cnt, block, torch.float32, key_stride=8, key_offset=15)


def test_reverse_index_lists_every_selection_once():
    gen = torch.Generator(torch.get_default_device()).manual_seed(5)
    idx, cnt = random_lists(2, 3, 9, 4, gen)
    off, rev = reverse_block_index(idx, cnt, 9)
    for r in range(6):
        z, h = divmod(r, 3)
        for j in range(9):
            got = sorted(rev[off[r, j]:off[r, j + 1]].tolist())
            want = sorted(i for i in range(9) if j in idx[z, h, i, : cnt[z, h, i]].tolist())
            assert got == want


def test_public_entry_defaults_and_errors():
    gen = torch.Generator(torch.get_default_device()).manual_seed(6)
    q, k, v = torch.randn(1, 2, 40, 64, generator=gen), torch.randn(1, 1, 40, 64, generator=gen), torch.randn(1, 1, 40, 64, generator=gen)
    idx = torch.arange(3, dtype=torch.int32).view(1, 1, 3, 1)  # diagonal blocks only
    out, lse = block_sparse_attention(q, k, v, idx, block_size=16, return_lse=True)
    ref, _ = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, torch.ones(1, 1, 3, dtype=torch.int32), 16)
    assert rel(out, ref) < 2e-5
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, idx, block_size=48)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attention(q[..., :48], k[..., :48], v[..., :48], idx, block_size=16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        block_sparse_attention(q[:, :1], torch.cat([k, k], 1), torch.cat([v, v], 1), idx.expand(1, 2, 3, 1), block_size=16)
    with pytest.raises(ValueError, match="query blocks"):
        block_sparse_attention(q, k, v, idx[:, :, :2], block_size=16)


def pack_heads(monkeypatch, block, heads, sub_tile=None, prefetch=0):
    """Pin HEADS_PER_PROGRAM (and IDX_PREFETCH) for all three kernels; sub_tile < block also splits
    the key loop of fwd/dQ and the query loop of dK/dV, so stacking is tested together with sub-tiling."""
    sub = block if sub_tile is None else sub_tile
    for key in ("fwd", "dq", "bwd"):
        monkeypatch.setitem(fn.CONFIG_OVERRIDE, key, (sub, 4, 1, heads, prefetch))


PACKED_CASES = [
    # (batch, q heads, kv heads, seq, head dim, block, max selected), heads per program, sub-tile, lists with diagonal
    pytest.param((2, 8, 2, 75, 32, 16, 3), 2, None, True, id="gqa4_ragged_2seq_heads2"),
    # the whole group in one program, with key/query sub-tiles and empty rows (-inf LSE)
    pytest.param((1, 8, 2, 91, 32, 32, 3), 4, 16, False, id="gqa4_heads4_subtile16_empty_rows"),
    # two packed programs per KV head, head dim 128
    pytest.param((1, 8, 1, 70, 128, 32, 2), 4, None, True, id="gqa8_d128_heads4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,heads,sub_tile,diagonal", PACKED_CASES)
def test_packed_heads_match_reference(case, heads, sub_tile, diagonal, dtype, monkeypatch):
    b, hq, hkv, s, d, block, maxsel = case
    gen = torch.Generator(torch.get_default_device()).manual_seed(hash((case, heads)) % 1000)
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = random_lists(b, hkv, -(-s // block), maxsel, gen, with_diagonal=diagonal)
    pack_heads(monkeypatch, block, heads, sub_tile)
    check_against_reference(q, k, v, idx, cnt, block, dtype)


def test_packed_heads_varlen_window_and_atomic_dq(monkeypatch):
    """Two heads per program with packed sequences + a token window, and with the atomic-dQ backward."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(8)
    lens = [37, 50, 16]
    hq, hkv, d, block, window = 4, 2, 32, 16, 24
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lens)
    q, k, v = torch.randn(1, hq, total, d, generator=gen), torch.randn(1, hkv, total, d, generator=gen), torch.randn(1, hkv, total, d, generator=gen)
    idx, cnt = window_block_lists(max(lens), block, window)
    idx, cnt = idx.expand(len(lens), hkv, -1, -1).clone(), cnt.expand(len(lens), hkv, -1).clone()
    for z, n in enumerate(lens):
        cnt[z, :, -(-n // block):] = 0
    pack_heads(monkeypatch, block, 2)
    check_against_reference(q, k, v, idx, cnt, block, torch.bfloat16, cu=cu, window=window)
    idx, cnt = random_lists(1, hkv, -(-total // block), 3, gen)
    check_against_reference(q, k, v, idx, cnt, block, torch.float32, atomic_dq=True)


def test_heads_per_program_must_divide_group(monkeypatch):
    gen = torch.Generator(torch.get_default_device()).manual_seed(9)
    q, k, v = torch.randn(1, 6, 40, 32, generator=gen), torch.randn(1, 2, 40, 32, generator=gen), torch.randn(1, 2, 40, 32, generator=gen)
    idx, cnt = random_lists(1, 2, 3, 2, gen)
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd", (16, 4, 1, 2))  # group size 3
    with pytest.raises(ValueError, match=r"HEADS_PER_PROGRAM.*'bwd'.*group size.*= 3.*got 2"):
        sparse_attention_core(q, k, v, idx, cnt, 16)
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd", (16, 4, 1, 3))  # divides 3 but is not an allowed value
    with pytest.raises(ValueError, match=r"HEADS_PER_PROGRAM.*\(1, 2, 4\)"):
        sparse_attention_core(q, k, v, idx, cnt, 16)


PREFETCH_CASES = [
    # ragged, 2 sequences, GQA 4: the dK/dV flat loop crosses 4 head groups; lists without the
    # diagonal, some empty (zero-trip loops, KV blocks no query block selected)
    pytest.param((2, 8, 2, 75, 32, 16, 3), 1, None, False, None, False, id="gqa4_ragged_empty_rows"),
    # key / query sub-tiles (flat (block, sub-tile) steps) with 2 packed heads (2 head groups), atomic dQ
    pytest.param((1, 8, 2, 91, 32, 32, 3), 2, 16, True, None, True, id="subtile16_heads2_atomic_dq"),
    # packed sequences + token window
    pytest.param((1, 4, 2, None, 32, 16, None), 1, None, True, 24, False, id="varlen_window"),  # lengths below
]


@pytest.mark.parametrize("case,heads,sub_tile,diagonal,window,atomic_dq", PREFETCH_CASES)
def test_index_prefetch_matches_reference_and_default_loops(case, heads, sub_tile, diagonal, window, atomic_dq,
                                                            monkeypatch):
    """IDX_PREFETCH=1 (flat loops, block numbers read one step early) against the fp64 reference,
    and bit for bit against the default loops (same arithmetic in the same order)."""
    b, hq, hkv, s, d, block, maxsel = case
    gen = torch.Generator(torch.get_default_device()).manual_seed(11)
    cu = None
    if window is None:
        q, k, v = (torch.randn(b, h, s, d, generator=gen) for h in (hq, hkv, hkv))
        idx, cnt = random_lists(b, hkv, -(-s // block), maxsel, gen, with_diagonal=diagonal)
    else:
        lens = [37, 50, 16]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (torch.randn(1, h, sum(lens), d, generator=gen) for h in (hq, hkv, hkv))
        idx, cnt = window_block_lists(max(lens), block, window)
        idx, cnt = idx.expand(len(lens), hkv, -1, -1).clone(), cnt.expand(len(lens), hkv, -1).clone()
        for z, n in enumerate(lens):
            cnt[z, :, -(-n // block):] = 0
    results = []
    for prefetch in (1, 0):
        pack_heads(monkeypatch, block, heads, sub_tile, prefetch)
        torch.manual_seed(0)  # same dO for both loop forms
        out, grads = check_against_reference(q, k, v, idx, cnt, block, torch.float32, cu=cu, window=window,
                                             atomic_dq=atomic_dq)
        _, lse = sparse_attention_core(q, k, v, idx, cnt, block, cu_seqlens_q=cu, window=window)
        results.append((out, lse, *grads))
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, c), name


def test_prefetch_flag_must_be_0_or_1(monkeypatch):
    gen = torch.Generator(torch.get_default_device()).manual_seed(12)
    q, k, v = torch.randn(1, 2, 40, 32, generator=gen), torch.randn(1, 2, 40, 32, generator=gen), torch.randn(1, 2, 40, 32, generator=gen)
    idx, cnt = random_lists(1, 2, 3, 2, gen)
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "dq", (16, 4, 1, 1, 2))
    with pytest.raises(ValueError, match=r"prefetch \(CONFIG_OVERRIDE\['dq'\]\[4\]\) must be 0 or 1, got 2"):
        sparse_attention_core(q, k, v, idx, cnt, 16)


def sink_lists(z, h, nqb, maxsel, gen):
    """Random causal lists where every query block also selects KV block 0 (an attention sink):
    block 0's reverse list is the whole sequence, the row the dK/dV split exists for."""
    idx, cnt = random_lists(z, h, nqb, maxsel - 1, gen)
    sink = torch.zeros(z, h, nqb, 1, dtype=idx.dtype)
    has_sink = (idx == 0) & (torch.arange(idx.shape[-1]) < cnt[..., None])
    idx = torch.cat([idx, sink], -1)
    # append block 0 where the list lacks it (entries must stay distinct)
    extra = ~has_sink.any(-1)
    last = torch.where(extra, cnt, idx.shape[-1] - 1).long()
    idx.scatter_(-1, last[..., None], torch.where(extra, 0, idx.gather(-1, last[..., None]).squeeze(-1))[..., None])
    return idx, (cnt + extra.int()).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefetch,varlen,kv_slice", [(0, False, 16), (1, True, 32), (1, False, 32), (0, True, 16)],
                         ids=["loops-batch-halfblock", "prefetch-varlen-block", "prefetch-batch-block", "loops-varlen-halfblock"])
def test_split_dkdv_rows_match_reference_and_are_bitwise_reproducible(dtype, prefetch, varlen, kv_slice, monkeypatch):
    """A popular KV block's reverse list cut into chunks of 2 entries (fp32 partials, then the
    fixed-order reduce), with whole 32-key blocks or 16-key slices per program: same gradients as
    the reference, identical bits on a second run, and within rounding of the unsplit pass."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(21 + prefetch + 2 * varlen)
    hq, hkv, d, block = 4, 2, 64, 32
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd_kv", kv_slice)
    if varlen:
        lens = [70, 33, 130]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        b, s, n_seq, nqb = 1, sum(lens), len(lens), -(-max(lens) // block)
    else:
        cu, b, s = None, 2, 141
        n_seq, nqb = b, -(-s // block)
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = sink_lists(n_seq, hkv, nqb, 4, gen)
    if varlen:
        for z, n in enumerate(lens):
            cnt[z, :, -(-n // block):] = 0
    for key in ("fwd", "dq", "bwd"):
        monkeypatch.setitem(fn.CONFIG_OVERRIDE, key, (block, 4, 1, 1, prefetch))
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd_chunk", 2)
    torch.manual_seed(0)
    _, split = check_against_reference(q, k, v, idx, cnt, block, dtype, cu=cu)
    torch.manual_seed(0)
    _, again = check_against_reference(q, k, v, idx, cnt, block, dtype, cu=cu)
    assert all(torch.equal(a, c) for a, c in zip(split, again))
    monkeypatch.delitem(fn.CONFIG_OVERRIDE, "bwd_chunk")
    torch.manual_seed(0)
    _, whole = check_against_reference(q, k, v, idx, cnt, block, dtype, cu=cu)
    assert torch.equal(split[0], whole[0])  # dQ has its own pass
    for a, c in zip(split[1:], whole[1:]):
        assert rel(a, c) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_dkdv_schedule_covers_every_entry_once_longest_first():
    gen = torch.Generator(torch.get_default_device()).manual_seed(22)
    idx, cnt = sink_lists(2, 3, 11, 5, gen)
    off, rev = reverse_block_index(idx, cnt, 11)
    chunk = 2
    item_row, item_chunk, row_chunks, order, chunks_sorted, item_end, chunk, slots = fn.dkdv_schedule(
        off, rev.numel(), 16, 64, 2, chunk)  # two key slices per block
    n_rows = off.shape[0] * 11 * 2
    counts = (off[:, 1:] - off[:, :-1]).repeat_interleave(2, dim=1).reshape(-1)
    real = item_row < n_rows
    assert not real[real.sum():].any()  # padding items only at the end
    pairs = sorted(zip(item_row[real].tolist(), item_chunk[real].tolist()))
    want = sorted((r, c) for r in range(n_rows) for c in range(max(1, -(-int(counts[r]) // chunk))))
    assert pairs == want
    assert (counts[item_row[real].long()].diff() <= 0).all()  # longest rows first
    split_items = (row_chunks[item_row[real].long()] > 1).nonzero().flatten()
    assert split_items.numel() > 0 and int(split_items.max()) < slots


@pytest.mark.parametrize("block", fn.ALLOWED_BLOCKS)
@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
def test_every_block_and_head_dim_runs_with_default_launch_configs(block, d, device):
    """Each (block size, head dim) the API accepts runs with its default launch configs (on an H200
    these must fit the shared memory: 232448 bytes per block) and matches the reference in bf16 with
    GQA 2. Under the CPU interpreter only the small combinations run (the rest cost minutes there)."""
    if device.type == "cpu" and block * d > 64 * 64:
        pytest.skip("large tiles take minutes under the interpreter; they run on the GPU")
    gen = torch.Generator(torch.get_default_device()).manual_seed(block + d)
    b, hq, hkv, s = 1, 4, 2, 2 * block + 5
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    idx, cnt = sink_lists(b, hkv, -(-s // block), 3, gen)
    check_against_reference(q, k, v, idx, cnt, block, torch.bfloat16)


STACKED_ENTRY_CASES = [
    # (batch, q heads, kv heads, seq, head dim, block, max selected), heads per program, query sub-tile,
    # index prefetch, dK/dV chunk (None: unsplit), varlen + window
    pytest.param((2, 8, 2, 75, 32, 16, 3), 2, None, 0, None, False, id="heads2_loops"),
    pytest.param((1, 8, 2, 91, 32, 32, 4), 1, 16, 1, 3, False, id="subtile16_prefetch_odd_chunks"),
    pytest.param((1, 4, 2, 0, 32, 16, 3), 1, None, 1, None, True, id="varlen_window_prefetch"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,heads,sub_tile,prefetch,chunk,varlen", STACKED_ENTRY_CASES)
def test_stacked_reverse_entries_match_reference(case, heads, sub_tile, prefetch, chunk, varlen, dtype, monkeypatch):
    """dK/dV steps that stack two reverse-list entries (query blocks) into one tile, including lists
    (and chunks) of odd length whose last step pads with empty rows: gradients as the reference's,
    bitwise reproducible, and within rounding of one entry per step."""
    b, hq, hkv, s, d, block, maxsel = case
    gen = torch.Generator(torch.get_default_device()).manual_seed(hash(case) % 1000)
    cu, window = None, None
    if varlen:
        lens = [37, 50, 16]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        s, window = sum(lens), 24
        idx, cnt = sink_lists(len(lens), hkv, -(-max(lens) // block), maxsel, gen)
        for z, n in enumerate(lens):
            cnt[z, :, -(-n // block):] = 0
    else:
        idx, cnt = sink_lists(b, hkv, -(-s // block), maxsel, gen)
    q, k, v = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    pack_heads(monkeypatch, block, heads, sub_tile, prefetch)
    if chunk is not None:
        monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd_chunk", chunk)
    grads = {}
    for entries in (2, 2, 1):
        monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd_entries", entries)
        torch.manual_seed(0)
        _, g = check_against_reference(q, k, v, idx, cnt, block, dtype, cu=cu, window=window)
        if entries in grads:
            assert all(torch.equal(a, c) for a, c in zip(g, grads[entries]))
        grads[entries] = g
    assert torch.equal(grads[2][0], grads[1][0])  # dQ has its own pass
    for a, c in zip(grads[2][1:], grads[1][1:]):
        assert rel(a, c) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_bad_stacked_entries_is_refused(monkeypatch):
    q = torch.randn(1, 2, 32, 16)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    monkeypatch.setitem(fn.CONFIG_OVERRIDE, "bwd_entries", 3)
    with pytest.raises(ValueError, match=r"CONFIG_OVERRIDE\['bwd_entries'\] must be one of \(1, 2, 4, 8\), got 3"):
        sparse_attention_core(q, q[:, :1], q[:, :1], idx, None, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the shared-memory limit is a GPU's")
def test_fp32_head_dim_256_with_128_token_blocks_is_refused_on_gpu():
    q = torch.randn(1, 2, 128, 256, device="cuda")
    idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"float32 inputs with head_dim > 128 need block_size <= 64"):
        sparse_attention_core(q, q, q, idx, None, 128)
    out, _ = sparse_attention_core(q.bfloat16(), q.bfloat16(), q.bfloat16(), idx, None, 128)  # the alternative runs
    assert torch.isfinite(out).all()
