#!/usr/bin/env bash
# Sets up sparsetron in ./.venv: torch first (TORCH_SPEC picks the build; the default is the version
# the tests run with), deepspeed built against that torch, then this project with its test extras.
# Idempotent: a second run only checks. Usage: bash install.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
# deepspeed's setup.py imports torch; without this it would pull a second torch into its build env
.venv/bin/python -c "import deepspeed" 2>/dev/null || \
  "${PIP[@]}" install --no-build-isolation -c constraints.txt "deepspeed>=0.19"
"${PIP[@]}" install -c constraints.txt -e ".[test]"
# DeepSpeed's CPU Adam, the optimizer whenever ZeRO offloads its state (optim.offload_impl), is a C++
# op: compile it once now into torch's extension cache (~1 min on 2 cores; a no-op when cached) so the
# first offloaded run and the tests do not pay it. Without a compiler this only warns: such a run
# then stops with one line saying to set optim.offload_impl=torch.
if cpu_adam=$(.venv/bin/python -c "from sparsetron.train.optim import load_cpu_adam_op; load_cpu_adam_op()" 2>&1); then
  echo "DeepSpeed CPU Adam op ready"
else
  echo "install.sh: DeepSpeed's CPU Adam op not built ($(echo "$cpu_adam" | tail -n 1)); offloaded runs need optim.offload_impl=torch"
fi
.venv/bin/python -c "import sparsetron, torch, triton, deepspeed, megatron.core, hydra, wandb; \
print(f'sparsetron {sparsetron.__version__} ready: torch {torch.__version__}, triton {triton.__version__}, '
      f'deepspeed {deepspeed.__version__}, cuda {torch.cuda.is_available()}')" 2>&1 | grep -v -i warn
