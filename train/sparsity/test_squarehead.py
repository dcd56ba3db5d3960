"""SquareHead loss against a hand computation (float64 loops), and the Distiller wiring."""

import math

import pytest
import torch

from sparsetron.train.sparsity import DistillConfig, Distiller, SquareHeadLoss, make_teacher


def _hand_loss(s_logits, t_logits, s_hidden, t_hidden, targets, ce_w, alpha, beta, temp):
    b, s, v = s_logits.shape
    ce = kl = 0.0
    valid = [(i, j) for i in range(b) for j in range(s) if targets[i, j] != -100]
    for i, j in valid:
        zs, zt = s_logits[i, j].tolist(), t_logits[i, j].tolist()
        lse = math.log(sum(math.exp(z) for z in zs))
        ce += lse - zs[targets[i, j]]
        ps_den = sum(math.exp(z / temp) for z in zs)
        pt_den = sum(math.exp(z / temp) for z in zt)
        for a, c in zip(zs, zt):
            ps, pt = math.exp(a / temp) / ps_den, math.exp(c / temp) / pt_den
            kl += pt * (math.log(pt) - math.log(ps))
    ce /= len(valid)
    kl = kl / len(valid) * temp**2
    sq = 0.0
    for hs, ht in zip(s_hidden, t_hidden):
        d = hs.shape[-1]
        mse = sum(float((hs[i, j] - ht[i, j]).pow(2).sum()) for i, j in valid) / (len(valid) * d)
        energy = sum(float(ht[i, j].pow(2).sum()) for i, j in valid) / (len(valid) * d)
        sq += mse / energy
    return ce_w * ce + alpha * kl + beta * sq, ce, kl, sq


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_matches_hand_computation(temp):
    torch.manual_seed(0)
    b, s, v, d = 2, 5, 7, 6
    s_logits, t_logits = torch.randn(b, s, v, dtype=torch.float64), torch.randn(b, s, v, dtype=torch.float64) * 2
    # layers at very different scales: the per-layer normalisation must weigh them alike
    t_hidden = [torch.randn(b, s, d, dtype=torch.float64) * scale for scale in (0.1, 1.0, 30.0)]
    s_hidden = [h + 0.3 * h.std() * torch.randn_like(h) for h in t_hidden]
    targets = torch.randint(0, v, (b, s))
    targets[0, 1] = targets[1, 4] = -100
    cfg = DistillConfig(ce_weight=0.7, alpha_kl=1.3, beta_squarehead=0.4, temperature=temp)
    out = SquareHeadLoss(cfg)(s_logits, t_logits, s_hidden, t_hidden, targets)
    loss, ce, kl, sq = _hand_loss(s_logits, t_logits, s_hidden, t_hidden, targets, 0.7, 1.3, 0.4, temp)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-6)
    assert (out["ce"].item(), out["kl"].item(), out["squarehead"].item()) == pytest.approx((ce, kl, sq), rel=1e-6)
    # each layer adds about 0.09 (noise 0.3 std squared) whatever its scale
    assert sq == pytest.approx(3 * 0.09, rel=0.35)


def test_gradient_flows_to_student_only():
    torch.manual_seed(1)
    s_logits = torch.randn(1, 3, 5, requires_grad=True)
    t_logits = torch.randn(1, 3, 5, requires_grad=True)
    hs, ht = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4, requires_grad=True)
    SquareHeadLoss()(s_logits, t_logits, [hs], [ht], torch.tensor([[1, 2, 3]]))["loss"].backward()
    assert s_logits.grad.abs().sum() > 0 and hs.grad.abs().sum() > 0
    assert t_logits.grad is None and ht.grad is None


def test_shape_errors():
    loss = SquareHeadLoss()
    with pytest.raises(ValueError, match="logits"):
        loss(torch.randn(1, 2, 3), torch.randn(1, 2, 4), [], [])
    with pytest.raises(ValueError, match="hidden states"):
        loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), [torch.randn(1, 2, 3)], [])


def test_distiller_on_tiny_llama(tiny_llama, device):
    student = tiny_llama()
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    tokens = torch.randint(0, 32, (2, 8))
    targets = torch.randint(0, 32, (2, 8))
    cfg = DistillConfig(alpha_kl=1.0, beta_squarehead=1.0)
    out = Distiller(teacher, cfg)(student, tokens, targets)
    # identical weights: nothing to distil, the loss is the task CE alone
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)
    # bitwise-equal block outputs on the CPU; on a GPU the frozen teacher's no-grad forward may take
    # other attention/matmul kernels than the student's, so equal up to fp32 rounding
    assert out["squarehead"].item() == pytest.approx(0.0, abs=1e-10 if device.type == "cpu" else 1e-4)
    assert out["loss"].item() == pytest.approx(student(tokens, targets).item(), rel=1e-6 if device.type == "cpu" else 1e-4)
    with torch.no_grad():
        student.layers[0].mlp.up_proj.weight.mul_(0.5)
    out = Distiller(teacher, cfg)(student, tokens, targets)
    assert out["squarehead"].item() > 0 and out["kl"].item() > 0
    out["loss"].backward()
    assert student.layers[0].mlp.up_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_must_be_dense(tiny_llama):
    from sparsetron.train.sparsity import Sparsifier, SparsityConfig

    model = tiny_llama()
    Sparsifier(model, SparsityConfig())
    with pytest.raises(ValueError, match="already sparse"):
        make_teacher(model)
