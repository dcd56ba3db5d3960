import pytest


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Every layer test here runs on the root conftest's `device` (the GPU when present), like the
    kernel tests these layers came from (kernels/conftest.py)."""
    yield
