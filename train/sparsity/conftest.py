import pytest
import torch

from sparsetron.configs.schema.model import ModelConfig
from sparsetron.train.model import Llama


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tiny matmuls: a second intra-op thread only adds sync cost, and on a shared 2-core CI box
    it made these tests ~7x slower. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Every sparsity test runs on the root conftest's `device` (the GPU when present)."""
    yield


@pytest.fixture
def tiny_llama():
    """Factory: a 2-layer Llama small enough for CPU tests (in_features divisible by 8)."""

    def make(seed: int = 0, **overrides) -> Llama:
        fields = dict(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16, tie_embeddings=False)
        fields.update(overrides)
        torch.manual_seed(seed)
        return Llama(ModelConfig(**fields))

    return make
