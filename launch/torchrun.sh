#!/usr/bin/env bash
# Launch `python -m sparsetron.train` under torchrun; every argument is a Hydra override.
#
# Single node (one process per GPU):
#     launch/torchrun.sh model=125m parallel.dp=8 train.max_steps=100
#     NPROC=2 launch/torchrun.sh model=125m parallel.dp=2
# Multi node (run the same command on every node, e.g. from slurm.sbatch):
#     NNODES=4 MASTER_ADDR=node01 MASTER_PORT=29500 RDZV_ID=run42 launch/torchrun.sh ...
#
# Knobs (environment):
#   NPROC          processes on this node: a number or "auto" (= GPUs, else CPUs)  [auto]
#   NNODES         number of nodes, or an elastic range "MIN:MAX"                   [1]
#   NODE_RANK      this node's rank; only the static backend uses it  [$SLURM_NODEID or 0]
#   MASTER_ADDR, MASTER_PORT  rendezvous host and port (multi node)      [-, 29500]
#   RDZV_ID        job id shared by all nodes                       [$SLURM_JOB_ID or none]
#   RDZV_BACKEND   c10d (default) or static (uses NODE_RANK / MASTER_ADDR directly)
#   MAX_RESTARTS   torchrun worker restarts; keep 0 under Slurm (Slurm requeues)   [0]
#   RUN_DIR        if set, passed as hydra.run.dir so every rank writes to one directory
#   TRAIN_MODULE   module to run                                     [sparsetron.train]
#   TORCHRUN       launcher command; set, it runs without the relay of launch/agent.py
#                  [python -m sparsetron.launch.agent, else torchrun]
#   PYTHON         interpreter for the agent                                     [python]
#   TORCHRUN_ARGS  extra torchrun flags (word-split)
#
# Preemption: SIGUSR1 or SIGTERM sent to this script is forwarded as SIGUSR1 to the
# training processes (torchrun's direct children); SIGUSR1 sent to the torchrun process
# (launch/agent.py) or to any worker reaches them too. The ranks agree, save one checkpoint and
# exit 75; this script then exits with 75 (see lib.sh) so the Slurm job script requeues. torchrun
# reports any failed worker as 1, so the workers write their exit code to a status file
# ($SPARSETRON_EXIT_STATUS_FILE) and this script exits with it: 75 requeue, 74 a save's I/O
# failed, 65 diverged (non-finite), 2 bad input; 1 stays "crashed".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/env.sh
source "$HERE/env.sh"
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-auto}}"
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-sparsetron}}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TRAIN_MODULE="${TRAIN_MODULE:-sparsetron.train}"

PYTHON="${PYTHON:-python}"
if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a launcher <<< "$TORCHRUN"
elif "$PYTHON" -c "import sparsetron.launch.agent" >/dev/null 2>&1; then
    # torchrun with a SIGUSR1 relay (launch/agent.py): signalling the torchrun process itself
    # checkpoints the job instead of killing the launcher.
    launcher=("$PYTHON" -m sparsetron.launch.agent)
elif command -v torchrun >/dev/null 2>&1; then
    launcher=(torchrun)
else
    launcher=("$PYTHON" -m torch.distributed.run)
fi

if ! [[ "$NPROC" =~ ^([0-9]+|auto|gpu|cpu)$ ]]; then
    echo "torchrun.sh: NPROC='$NPROC' must be a number or auto|gpu|cpu" >&2
    exit 2
fi

args=(--nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS")
if [[ "$NNODES" == "1" ]]; then
    args+=(--standalone --nnodes=1)
else
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the rendezvous host)" >&2
        exit 2
    fi
    case "$RDZV_BACKEND" in
        c10d)
            args+=(--nnodes="$NNODES" --rdzv-backend=c10d
                   --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
                   --rdzv-conf="join_timeout=${RDZV_JOIN_TIMEOUT:-900}") ;;
        static)
            args+=(--nnodes="$NNODES" --node-rank="$NODE_RANK"
                   --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT") ;;
        *)
            echo "torchrun.sh: RDZV_BACKEND='$RDZV_BACKEND' must be c10d or static" >&2
            exit 2 ;;
    esac
fi
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a extra <<< "$TORCHRUN_ARGS"
    args+=("${extra[@]}")
fi

overrides=("$@")
if [[ -n "${RUN_DIR:-}" ]]; then
    overrides+=("hydra.run.dir=$RUN_DIR")
fi

if [[ "$NODE_RANK" == "0" ]]; then
    echo "[torchrun.sh] ${launcher[*]} ${args[*]} -m $TRAIN_MODULE ${overrides[*]}" >&2
fi

status_file="$(mktemp "${TMPDIR:-/tmp}/sparsetron-exit.XXXXXX")"
export SPARSETRON_EXIT_STATUS_FILE="$status_file"
preempted=0
torchrun_pid=""
forward_preemption() {
    preempted=1
    [[ -n "$torchrun_pid" ]] || return 0
    local child
    for child in $(child_pids "$torchrun_pid"); do
        kill -USR1 "$child" 2>/dev/null || true
    done
    echo "[torchrun.sh] node $NODE_RANK: preemption signal forwarded to workers" >&2
}
trap forward_preemption USR1 TERM

# torchrun starts with SIGUSR1 ignored (inherited through exec): Slurm may deliver the signal
# to every process of the step, and torchrun has no handler for it (default action: exit).
# The workers inherit the ignore too until PreemptionHandler.install() takes the signal over.
( trap '' USR1; exec "${launcher[@]}" "${args[@]}" -m "$TRAIN_MODULE" "${overrides[@]}" ) &
torchrun_pid=$!

set +e
wait_for "$torchrun_pid"
rc=$?
set -e
trap - USR1 TERM

worker_codes=" $(tr '\n' ' ' < "$status_file" 2>/dev/null || true)"
rm -f "$status_file"
if (( rc != 0 )); then
    if (( preempted )) || (( rc == SPARSETRON_REQUEUE_EXIT_CODE )) \
        || [[ "$worker_codes" == *" $SPARSETRON_REQUEUE_EXIT_CODE "* ]]; then
        exit "$SPARSETRON_REQUEUE_EXIT_CODE"
    fi
    read -r first_code _ <<< "$worker_codes"
    if [[ "${first_code:-}" =~ ^[0-9]+$ ]]; then
        exit "$first_code"
    fi
fi
exit "$rc"
