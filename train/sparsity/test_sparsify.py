"""Sparsifier on a tiny Llama: layer selection, names, N:M after every optimizer step (fixed and
SR-STE), the SR-STE gradient, schedules, resume, export."""

import pytest
import torch
from torch import nn

from sparsetron.kernels.nm_sparse import nm_mask
from sparsetron.train.sparsity import NMSparseLinear, Sparsifier, SparsityConfig, collect_input_norms, gradual_n, verify_nm


def _tokens(seed, b=4, s=12, v=32):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return torch.randint(0, v, (b, s), generator=g), torch.randint(0, v, (b, s), generator=g)


def _assert_exact_nm(model, sp, n, m, fixed):
    for name, layer in sp.layers.items():
        kept = layer.weight_mask.view(-1, m).sum(-1)
        assert (kept == n).all(), name
        assert ((layer.effective_weight().view(-1, m) != 0).sum(-1) <= n).all(), name
        if fixed:
            assert (layer.weight.detach()[~layer.weight_mask] == 0).all(), f"{name}: pruned weight not exactly 0"
    assert verify_nm(model, n, m) == len(sp.layers)


def test_layers_replaced_names_and_parameters_kept(tiny_llama):
    model = tiny_llama()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    sp = Sparsifier(model, SparsityConfig())
    assert len(sp.layers) == 2 * 7
    assert list(model.state_dict()) == keys  # checkpoints keep the dense layout
    for name, p in model.named_parameters():
        assert p is params[name]  # an optimizer built before sparsify stays valid
    assert isinstance(model.layers[0].attn.q_proj, NMSparseLinear) and isinstance(model.layers[0].attn.q_proj, nn.Linear)
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding


def test_layer_patterns_and_bad_layers(tiny_llama):
    sp = Sparsifier(tiny_llama(), SparsityConfig(layers=["layers.1.mlp.*"]))
    assert sorted(sp.layers) == ["layers.1.mlp.down_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        Sparsifier(tiny_llama(), SparsityConfig(layers=["*.nope"]))
    with pytest.raises(ValueError, match="shares its weight with the embedding"):
        Sparsifier(tiny_llama(tie_embeddings=True), SparsityConfig(layers=["head"]))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj has in_features=36"):
        Sparsifier(tiny_llama(ffn_dim=36), SparsityConfig(n=4, m=8))
    model = tiny_llama()
    sp2 = Sparsifier(model, SparsityConfig())
    with pytest.raises(RuntimeError, match="init_masks"):
        sp2.after_optimizer_step(1)
    with pytest.raises(ValueError, match="already sparse"):
        Sparsifier(model, SparsityConfig())


@pytest.mark.parametrize("mode", ["fixed", "srste"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_exact_nm_after_every_optimizer_step(tiny_llama, mode, n, m):
    model = tiny_llama()
    sp = Sparsifier(model, SparsityConfig(n=n, m=m, mode=mode, srste_decay=1e-2, mask_update_every=2))
    sp.init_masks()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)  # big steps: masks do move in SR-STE
    _assert_exact_nm(model, sp, n, m, fixed=mode == "fixed")
    masks0 = {k: v.weight_mask.clone() for k, v in sp.layers.items()}
    changed = []
    for step in range(1, 7):
        tokens, targets = _tokens(step)
        opt.zero_grad()
        model(tokens, targets).backward()
        sp.before_optimizer_step()
        opt.step()
        changed.append(sp.after_optimizer_step(step))
        _assert_exact_nm(model, sp, n, m, fixed=mode == "fixed")
    moved = any(not torch.equal(masks0[k], v.weight_mask) for k, v in sp.layers.items())
    if mode == "fixed":
        assert changed == [False] * 6 and not moved
    else:
        assert changed == [False, True] * 3 and moved  # recomputed every 2nd step, from dense weights
        pruned = [v.weight.detach()[~v.weight_mask] for v in sp.layers.values()]
        assert all((p != 0).all() for p in pruned)  # SR-STE keeps the dense weights


def test_srste_gradient_through_sparsifier_equals_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=True))
    decay = 0.05
    sp = Sparsifier(model, SparsityConfig(layers=["0"], mode="srste", srste_decay=decay))
    sp.init_masks()
    w = model[0].weight
    mask = model[0].weight_mask
    assert torch.equal(mask, nm_mask(w, 2, 4))
    x = torch.randn(5, 16, dtype=torch.float32)
    gy = torch.randn(5, 8)
    # accumulate two micro-batches: the decay must still be added once
    (model(x) * gy).sum().backward()
    (model(x) * gy).sum().backward()
    sp.before_optimizer_step()
    w64, x64, g64, m64 = w.detach().double(), x.double(), gy.double(), mask.double()
    expected = 2 * (g64.t() @ x64) + decay * (1 - m64) * w64  # STE: dense grad of W~, pruned entries included
    assert ((w.grad.double() - expected).norm() / expected.norm()).item() < 1e-6
    assert ((model[0].bias.grad.double() - 2 * g64.sum(0)).norm()).item() < 1e-5
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    sp.after_optimizer_step(1)
    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        sp.after_optimizer_step(2)  # decay not applied for step 2


def test_gradual_ramp(tiny_llama):
    cfg = SparsityConfig(n=2, m=8, schedule="gradual", ramp_start_step=2, ramp_end_step=12, mode="fixed")
    ns = [gradual_n(s, cfg) for s in range(0, 15)]
    assert ns[0] == ns[2] == 8 and ns[12:] == [2, 2, 2]
    assert all(a >= b for a, b in zip(ns, ns[1:])) and len(set(ns)) > 3  # monotone, several stages
    model = tiny_llama()
    sp = Sparsifier(model, cfg)
    sp.init_masks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 14):
        tokens, targets = _tokens(step)
        opt.zero_grad()
        model(tokens, targets).backward()
        sp.before_optimizer_step()
        opt.step()
        sp.after_optimizer_step(step)
        _assert_exact_nm(model, sp, ns[step], 8, fixed=True)
    verify_nm(model, 2, 8)


def test_state_dict_resume_and_export(tiny_llama):
    model = tiny_llama()
    sp = Sparsifier(model, SparsityConfig(mode="srste", method="wanda"))
    sp.init_masks([_tokens(i)[0] for i in range(2)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 3):
        opt.zero_grad()
        model(*_tokens(step)).backward()
        sp.before_optimizer_step()
        opt.step()
        sp.after_optimizer_step(step)
    tokens, _ = _tokens(9)
    with torch.no_grad():
        ref = model(tokens)

    resumed = tiny_llama(seed=5)
    sp2 = Sparsifier(resumed, SparsityConfig(mode="srste", method="wanda"))
    resumed.load_state_dict(model.state_dict())
    sp2.load_state_dict(sp.state_dict())
    with torch.no_grad():
        assert torch.equal(resumed(tokens), ref)
    assert sp2.input_norms.keys() == sp.input_norms.keys()

    exported = sp.export_state_dict()
    dense = tiny_llama(seed=7)
    assert list(exported) == list(dense.state_dict())
    dense.load_state_dict(exported)
    with torch.no_grad():
        assert torch.allclose(dense(tokens), ref, atol=1e-6)
    verify_nm(dense, 2, 4, layers=SparsityConfig().layers)

    sp.finalize()
    assert type(model.layers[0].attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(model(tokens), ref, atol=1e-6)
    verify_nm(model, 2, 4, layers=SparsityConfig().layers)


def test_wanda_norms_and_masks(tiny_llama):
    model = tiny_llama()
    batches = [_tokens(i)[0] for i in range(3)]
    # hand norms: capture the inputs of one layer directly
    seen = []
    h = model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    hand = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).norm(dim=0)
    norms = collect_input_norms(model, {"down": model.layers[1].mlp.down_proj}, batches)
    assert torch.allclose(norms["down"], hand, rtol=1e-5)

    with pytest.raises(ValueError, match="calibration_batches"):
        Sparsifier(tiny_llama(), SparsityConfig(method="wanda")).init_masks()
    sp = Sparsifier(model, SparsityConfig(method="wanda", mode="fixed"))
    w_before = model.layers[1].mlp.down_proj.weight.detach().clone()
    sp.init_masks(batches)
    expected = nm_mask(w_before, 2, 4, scores=w_before.abs() * hand[None, :])
    assert torch.equal(model.layers[1].mlp.down_proj.weight_mask, expected)
    assert not torch.equal(expected, nm_mask(w_before, 2, 4))  # Wanda differs from magnitude here


def test_layers_turn_sparse_in_place_keeping_hooks_and_gathering_full_weights(tiny_llama):
    """Engines wrap the model before the recipe attaches (ZeRO-3 hooks on these very modules): the
    layers stay the same objects, their hooks keep running, and masks are computed inside
    `full_params` one layer at a time."""
    import contextlib

    model = tiny_llama()
    layer = model.layers[0].attn.q_proj
    seen = []
    layer.register_forward_pre_hook(lambda mod, args: seen.append(mod))
    entered = []

    @contextlib.contextmanager
    def full_params(params):
        entered.append(len(params))
        yield

    sp = Sparsifier(model, SparsityConfig(), full_params=full_params)
    assert model.layers[0].attn.q_proj is layer and isinstance(layer, NMSparseLinear)
    sp.init_masks()
    assert entered == [1] * len(sp.layers)
    model(_tokens(0)[0])
    assert seen == [layer]
    sp.finalize()
    assert type(layer) is nn.Linear and model.layers[0].attn.q_proj is layer and not hasattr(layer, "weight_mask")


def test_srste_decay_inside_backward_equals_decay_added_to_grad(tiny_llama):
    """DeepSpeed keeps gradients in its own buffers: the decay goes into each micro-batch's backward,
    decay / n each, and the step's gradient must be the one the .grad path gives."""
    grads = []
    for decay, in_backward in ((0.05, False), (0.05, True), (0.0, False)):
        model = tiny_llama()
        sp = Sparsifier(model, SparsityConfig(srste_decay=decay))
        sp.init_masks()
        if in_backward:
            sp.decay_in_backward(3)
        for i in range(3):
            (model(*_tokens(i)) / 3).backward()
        sp.before_optimizer_step()
        grads.append({name: layer.weight.grad.clone() for name, layer in sp.layers.items()})
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-7)
        assert (want - grads[2][name]).abs().max() > 1e-4  # the decay is there (vs no decay)
