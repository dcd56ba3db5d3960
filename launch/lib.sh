# shellcheck shell=bash
# Shared bash helpers for the launch scripts (sourced). Pure bash + coreutils, so they also
# run in a test environment without Slurm.

# Exit codes shared with sparsetron/train/resilience.py (tests check they agree).
SPARSETRON_REQUEUE_EXIT_CODE=75   # EX_TEMPFAIL: checkpoint saved after a preemption signal
SPARSETRON_WATCHDOG_EXIT_CODE=86  # the Python watchdog found a hung rank

# expand_nodelist LIST: print one host per line for a Slurm hostlist expression such as
# "node[01-03,07]", "a,b", "gpu-1" or "rack[1-2]-n[01-02]" (zero padding is kept).
# Used when `scontrol show hostnames` is unavailable.
expand_nodelist() {
    local list="$1" item="" depth=0 ch i
    if [[ -z "$list" ]]; then
        echo "expand_nodelist: empty nodelist" >&2
        return 1
    fi
    # Split on commas that are outside brackets.
    for (( i = 0; i < ${#list}; i++ )); do
        ch="${list:i:1}"
        case "$ch" in
            "[") depth=$((depth + 1)); item+="$ch" ;;
            "]") depth=$((depth - 1)); item+="$ch" ;;
            ",")
                if (( depth == 0 )); then
                    [[ -n "$item" ]] && { _expand_host_expr "$item" || return 1; }
                    item=""
                else
                    item+="$ch"
                fi ;;
            *) item+="$ch" ;;
        esac
    done
    if (( depth != 0 )); then
        echo "expand_nodelist: unbalanced brackets in '$list'" >&2
        return 1
    fi
    [[ -z "$item" ]] || _expand_host_expr "$item"
}

# _expand_host_expr EXPR: expand the first [...] group of one host expression, recursing
# on the rest (so several groups give their cartesian product).
_expand_host_expr() {
    local expr="$1"
    if [[ "$expr" != *"["* ]]; then
        printf '%s\n' "$expr"
        return 0
    fi
    local prefix="${expr%%\[*}"
    local rest="${expr#*\[}"
    local ranges="${rest%%\]*}"
    local suffix="${rest#*\]}"
    local part lo hi width n IFS=','
    for part in $ranges; do
        if [[ "$part" == *-* ]]; then
            lo="${part%%-*}"; hi="${part#*-}"
        else
            lo="$part"; hi="$part"
        fi
        if ! [[ "$lo" =~ ^[0-9]+$ && "$hi" =~ ^[0-9]+$ ]]; then
            echo "expand_nodelist: bad range '$part' in '$expr'" >&2
            return 1
        fi
        width=${#lo}
        for (( n = 10#$lo; n <= 10#$hi; n++ )); do
            IFS=' ' _expand_host_expr "$(printf '%s%0*d%s' "$prefix" "$width" "$n" "$suffix")" \
                || return 1
        done
    done
}

# first_host LIST: the first host of a Slurm nodelist (the rendezvous / MASTER_ADDR host).
first_host() {
    local list="$1"
    if command -v scontrol >/dev/null 2>&1; then
        local h
        h="$(scontrol show hostnames "$list" 2>/dev/null | head -n 1)"
        if [[ -n "$h" ]]; then
            printf '%s\n' "$h"
            return 0
        fi
    fi
    local hosts
    hosts="$(expand_nodelist "$list")" || return 1
    printf '%s\n' "${hosts%%$'\n'*}"
}

# child_pids PID: direct children of PID, one per line (pgrep, else a /proc scan).
child_pids() {
    local parent="$1"
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$parent" || true
        return 0
    fi
    local stat f fields
    for f in /proc/[0-9]*/stat; do
        stat="$(cat "$f" 2>/dev/null)" || continue
        # Fields after the "(comm)" that may contain spaces: state ppid ...
        read -r -a fields <<< "${stat##*) }"
        [[ "${fields[1]:-}" == "$parent" ]] && { f="${f#/proc/}"; echo "${f%/stat}"; }
    done
    return 0
}

# wait_for PID: wait until PID exits even if trapped signals interrupt `wait`; returns
# its exit status.
wait_for() {
    local pid="$1" rc
    while true; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || return "$rc"
    done
}
