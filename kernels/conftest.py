import pytest
import torch


@pytest.fixture
def device():
    """Run on the GPU when there is one, else on CPU through the Triton interpreter."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with dev:  # default device for tensor factories inside the test
        yield dev
