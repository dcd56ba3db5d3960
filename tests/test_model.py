import pytest
import torch

from sparsetron.configs.schema import ModelConfig
from sparsetron.train.checkpoint import CheckpointError
from sparsetron.train.hf import export_hf, import_hf
from sparsetron.train.model import Llama

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)


@pytest.mark.parametrize("tie,kv", [(True, 2), (False, 4), (False, 1)])
def test_matches_transformers_llama_after_export(tmp_path, tie, kv):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(tie + kv)
    model = Llama(ModelConfig(**{**SMALL, "n_kv_heads": kv, "tie_embeddings": tie, "rope_theta": 5000.0})).eval()
    for p in model.parameters():  # norms away from 1, so a wrong norm mapping shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    folder = export_hf(model, str(tmp_path / "hf"))
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        back = import_hf(folder)(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(back, ours)


def test_export_refuses_moe(tmp_path):
    model = Llama(ModelConfig(**SMALL))
    model.cfg = ModelConfig(**{**SMALL, "mlp": "moe"})
    with pytest.raises(CheckpointError, match="model.mlp"):
        export_hf(model, str(tmp_path / "hf"))


@pytest.mark.parametrize("policy", ["attention", "full"])
def test_activation_checkpointing_keeps_gradients(policy):
    torch.manual_seed(0)
    base = Llama(ModelConfig(**SMALL))
    ckpt = Llama(ModelConfig(**SMALL, activation_checkpointing=policy))
    ckpt.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 300, (2, 33))
    grads = []
    for m in (base, ckpt):
        m(tokens, tokens.roll(-1, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_hidden_states_and_seq_limit():
    model = Llama(ModelConfig(**SMALL))
    tokens = torch.randint(0, 300, (1, 16))
    logits, hidden = model(tokens, output_hidden_states=True)
    assert logits.shape == (1, 16, 300) and len(hidden) == 2 and hidden[0].shape == (1, 16, 64)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_causal():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL)).eval()
    a = torch.randint(0, 300, (1, 20))
    b = a.clone()
    b[0, 15:] = (b[0, 15:] + 1) % 300
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :15], model(b)[:, :15])


@pytest.mark.parametrize("tie", [True, False])
def test_fused_kernels_match_unfused_loss_and_gradients(tie):
    """model.fused_kernels=true (Triton RMSNorm+residual, RoPE, SwiGLU, linear-CE; under the
    interpreter on CPU) against the plain model on the same weights."""
    torch.manual_seed(1)
    cfg = dict(SMALL, vocab_size=301, tie_embeddings=tie)
    plain = Llama(ModelConfig(**cfg))
    fused = Llama(ModelConfig(**cfg, fused_kernels=True))
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 301, (2, 19))
    targets = torch.randint(0, 301, (2, 19))
    targets[0, :3] = -100
    losses, grads = [], []
    for m in (plain, fused):
        loss = m(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
