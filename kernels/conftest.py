import pytest


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Every kernel test runs on the root conftest's `device` (the GPU when present)."""
    yield
