# shellcheck shell=bash
# Environment knobs for every sparsetron launch, in one place. Sourced (not executed) by
# torchrun.sh and slurm.sbatch; source it yourself before a hand-written launch:
#     source launch/env.sh
# Every knob below uses ${VAR:-default}: a value already in the environment wins, so a
# cluster can override anything by exporting it before the launch. The three NVLink
# multicast switches are the exception: they are forced (see below).

# --- NVLink multicast (NVLS) must stay off -------------------------------------------
# The shared machines forbid multicast objects; NCCL's NVLS algorithms, torch symmetric
# memory and NVSHMEM would otherwise allocate them. Forced, not defaulted, on purpose.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

# --- Failure detection ---------------------------------------------------------------
# 1 = on an NCCL error or timeout, abort the communicator and tear the process down, so a
# hung collective ends the job instead of burning the allocation.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Collective timeout for init_process_group (read by sparsetron.train.resilience.
# dist_timeout()). NCCL's C++ watchdog aborts after this long.
export SPARSETRON_DIST_TIMEOUT_S="${SPARSETRON_DIST_TIMEOUT_S:-1800}"
# The Python watchdog (train/resilience.py) fires first (shorter), so each rank prints
# *which* collective/region it is stuck in plus all thread stacks before NCCL aborts.
export SPARSETRON_WATCHDOG_TIMEOUT_S="${SPARSETRON_WATCHDOG_TIMEOUT_S:-900}"
export SPARSETRON_HEARTBEAT_S="${SPARSETRON_HEARTBEAT_S:-300}"
# Monitor thread: kills the process if NCCL's own watchdog thread stops responding
# (e.g. a CUDA call that never returns).
export TORCH_NCCL_ENABLE_MONITORING="${TORCH_NCCL_ENABLE_MONITORING:-1}"
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}"
# Flight recorder: keep the last N collectives per rank and dump them on timeout. Both the
# old (TORCH_NCCL_*) and new (TORCH_FR_*) names are set; torch versions read one or the other.
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-$TORCH_NCCL_TRACE_BUFFER_SIZE}"
SPARSETRON_TRACE_DIR="${SPARSETRON_TRACE_DIR:-${TMPDIR:-/tmp}/sparsetron_nccl_trace}"
mkdir -p "$SPARSETRON_TRACE_DIR" 2>/dev/null || true
export SPARSETRON_TRACE_DIR
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$SPARSETRON_TRACE_DIR/rank_}"
export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$TORCH_NCCL_DEBUG_INFO_TEMP_FILE}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Time torchrun gives workers to exit after it forwards SIGTERM (Slurm time limit,
# scancel) before it SIGKILLs them: long enough for a preemption checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}"

# --- Threads -------------------------------------------------------------------------
# One process per GPU: give each an equal share of this node's cores (torchrun would set
# 1). Local process count: NPROC if numeric, else GPUs seen by nvidia-smi, else 1.
_sp_cores="${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}"
if [[ "${NPROC:-}" =~ ^[0-9]+$ ]]; then
    _sp_local="$NPROC"
elif command -v nvidia-smi >/dev/null 2>&1; then
    _sp_local="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"  # set -e safe
else
    _sp_local=1
fi
(( _sp_local >= 1 )) || _sp_local=1
_sp_threads=$(( _sp_cores / _sp_local ))
(( _sp_threads >= 1 )) || _sp_threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$_sp_threads}"
unset _sp_cores _sp_local _sp_threads

# --- Misc ----------------------------------------------------------------------------
export PYTHONUNBUFFERED=1                     # log lines reach Slurm's .out file promptly
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"  # no fork warnings
