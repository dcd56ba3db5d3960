# Root conftest: on a machine without a GPU, Triton kernels run under the interpreter.
# Must be set before any module decorated with @triton.jit is imported.
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
