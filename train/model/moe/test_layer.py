"""MoEMLP module: Triton path vs the PyTorch loop for every parameter gradient (router gate included),
shared expert, registry wiring, activation memory vs the grouped_mm anchor, and a tiny MoE Llama
that trains end to end."""

import pytest
import torch

from sparsetron.configs.schema.model import ModelConfig
from sparsetron.configs.schema.moe import MoEConfig
from sparsetron.kernels._triton import interpreting
from sparsetron.kernels.moe.function import moe_experts
from sparsetron.kernels.moe.grouped_mm_anchor import grouped_mm_available, moe_experts_grouped_mm
from sparsetron.train.model.llama import Llama
from sparsetron.train.model.moe.layer import MoEMLP
from sparsetron.train.model.moe.router import Router
from sparsetron.train.model.registry import get_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs a GPU or TRITON_INTERPRET=1")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@needs_triton
@pytest.mark.parametrize(
    "cfg",
    [
        dict(score_func="softmax", load_balancing="aux_loss", z_loss_coef=1e-3, shared_expert_ffn_dim=24),
        dict(score_func="sigmoid", load_balancing="aux_free", token_rounding=True, tile_m=16),
    ],
    ids=["softmax-aux-zloss-shared", "sigmoid-auxfree-rounding"],
)
def test_layer_triton_matches_torch(cfg):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=6, top_k=2, expert_ffn_dim=40, **cfg)
    fast = MoEMLP(48, MoEConfig(**{**moe.__dict__, "implementation": "triton"})).to(DEVICE)
    slow = MoEMLP(48, MoEConfig(**{**moe.__dict__, "implementation": "torch"})).to(DEVICE).double()
    slow.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(3, 17, 48, device=DEVICE)
    dy = torch.randn(3, 17, 48, device=DEVICE)
    outs = []
    for m, xi in ((fast, x), (slow, x.double())):
        xi = xi.clone().requires_grad_()
        y = m(xi)
        loss = (y * dy.to(y.dtype)).sum() + (m.aux_loss if m.aux_loss is not None else 0)
        loss.backward()
        outs.append([y, xi.grad] + [p.grad for _, p in sorted(m.named_parameters())])
    names = ["out", "dx"] + [n for n, _ in sorted(fast.named_parameters())]
    assert "router.weight" in names and "gate_up_proj.weight" in names
    tol = 1e-5 if interpreting() else 5e-3
    for name, a, b in zip(names, *outs):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    stats = fast.last_stats
    assert stats["expert_load"].shape == (6,) and stats["expert_load"].sum() > 0
    assert {"tokens_dropped", "tokens_added", "experts_per_token"} <= set(stats)
    if cfg.get("token_rounding"):
        assert (stats["expert_load"] % 16 == 0).all()
        assert "expert_bias" in stats and fast.aux_loss is None
    else:
        assert fast.aux_loss is not None and "balance_loss" in stats and "z_loss" in stats


def test_registry_builds_moe_and_rejects_bad_config():
    layer = get_mlp("moe")(ModelConfig(dim=32), MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16), 0)
    assert isinstance(layer, MoEMLP) and layer.gate_up_proj.weight.shape == (4, 32, 32)
    with pytest.raises(ValueError, match="implementation"):
        MoEMLP(32, MoEConfig(implementation="cutlass"))
    with pytest.raises(ValueError, match="moe config"):
        get_mlp("moe")(ModelConfig(dim=32), None, 0)


@pytest.mark.cpu  # what a CPU-only user gets
def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU-only user: "auto" must take the PyTorch loop
    layer = MoEMLP(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8))
    y = layer(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="implementation='triton'"):
        MoEMLP(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, implementation="triton"))(torch.randn(1, 3, 16))


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward (parameters and the input excluded: every layer keeps those)."""
    kept = {}

    def pack(t):
        kept[id(t)] = t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


@needs_triton
@pytest.mark.skipif(not grouped_mm_available(torch.device(DEVICE), torch.bfloat16), reason="no torch._grouped_mm")
def test_activation_memory_below_grouped_mm_anchor():
    torch.manual_seed(0)
    t, d, f, e, k = 64, 64, 32, 8, 4
    router = Router(d, e, k).to(DEVICE)
    x = torch.randn(t, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(e, 2 * f, d, device=DEVICE) * 0.1).bfloat16().requires_grad_()
    w2 = (torch.randn(e, d, f, device=DEVICE) * 0.1).bfloat16().requires_grad_()
    routing, _, _ = router(x.detach().float())
    ours = _saved_bytes(lambda: moe_experts(x, w1, w2, routing, "triton")) - x.numel() * 2
    anchor = _saved_bytes(lambda: moe_experts_grouped_mm(x, w1, w2, routing)) - x.numel() * 2
    # ours: H (A x 2F) + routing; anchor additionally keeps the gathered x, act and expert outputs
    assert ours <= 0.6 * anchor, (ours, anchor)


def test_tiny_moe_llama_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, mlp="moe")
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, z_loss_coef=1e-3)
    model = Llama(cfg, moe_cfg=moe).to(DEVICE)
    assert any(isinstance(m, MoEMLP) for m in model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 9), device=DEVICE)
    losses = []
    for _ in range(10):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        assert model.aux_loss() is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < 0.7 * losses[0], losses
    for m in model.modules():
        if isinstance(m, MoEMLP):
            assert m.last_stats["expert_load"].sum() == 2 * 8 * 2


def _layer_grads(m, x, dy):
    x = x.clone().requires_grad_()
    y = m(x)
    ((y.float() * dy).sum() + (m.aux_loss if m.aux_loss is not None else 0)).backward()
    return [y, x.grad] + [p.grad for _, p in sorted(m.named_parameters())]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
@pytest.mark.parametrize("tokens", [37, 64])
def test_layer_grouped_mm_implementation_matches_torch(tokens):
    """moe.implementation=grouped_mm (the anchor, trainable in a model) against the per-expert loop."""
    torch.manual_seed(tokens)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # CUDA grouped_mm is bf16-only
    moe = MoEConfig(num_experts=5, top_k=2, expert_ffn_dim=32, token_rounding=tokens == 64, tile_m=16)
    # Token rounding keeps or drops tokens by their rank in router score at the tile boundary; bf16
    # and fp64 scores order near-ties differently, so with rounding the reference runs in the layer's
    # own dtype and sees the same routing (the experts' math is then the only difference).
    ref_dtype = dtype if moe.token_rounding else torch.float64
    fast = MoEMLP(40, MoEConfig(**{**moe.__dict__, "implementation": "grouped_mm"})).to(DEVICE, dtype)
    slow = MoEMLP(40, MoEConfig(**{**moe.__dict__, "implementation": "torch"})).to(DEVICE, ref_dtype)
    slow.load_state_dict({k: v.to(ref_dtype) for k, v in fast.state_dict().items()})
    x, dy = torch.randn(tokens, 40, device=DEVICE), torch.randn(tokens, 40, device=DEVICE)
    names = ["out", "dx"] + [n for n, _ in sorted(fast.named_parameters())]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(names, _layer_grads(fast, x.to(dtype), dy), _layer_grads(slow, x.to(ref_dtype), dy.to(ref_dtype))):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_layer_under_autocast_runs_experts_in_the_autocast_dtype():
    """fp32 master weights + fp32 residual under bf16 autocast: the expert GEMMs see bf16 (as F.linear
    would), the weights' gradients come back fp32, and the result is close to the fp32 layer."""
    torch.manual_seed(0)
    m = MoEMLP(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, implementation="torch")).to(DEVICE)
    x, dy = torch.randn(2, 9, 32, device=DEVICE), torch.randn(2, 9, 32, device=DEVICE)
    ref = _layer_grads(m, x, dy)
    m.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _layer_grads(m, x, dy)
    assert got[0].dtype == torch.bfloat16
    assert m.gate_up_proj.weight.grad.dtype == torch.float32 and m.down_proj.weight.grad.dtype == torch.float32
    for a, b in zip(got, ref):
        assert 0 < rel_err(a.float(), b) < 3e-2
