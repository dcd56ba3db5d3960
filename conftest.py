# Root conftest: on a machine without a GPU, Triton kernels run under the interpreter.
# Must be set before any module decorated with @triton.jit is imported.
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu: stays on the CPU even where a GPU is present (the test is about the CPU path or CPU data)")


@pytest.fixture
def device(request):
    """The device of a kernel test: the GPU when there is one, else the CPU (Triton kernels then run
    under the interpreter). Tensor factories inside the test default to it. Kernel and sparsity test
    folders use it for every test (their conftest autouses it); `@pytest.mark.cpu` keeps a test on the CPU."""
    on_gpu = torch.cuda.is_available() and request.node.get_closest_marker("cpu") is None
    dev = torch.device("cuda" if on_gpu else "cpu")
    with dev:
        yield dev
