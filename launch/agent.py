"""torchrun with a preemption relay: `python -m sparsetron.launch.agent [torchrun arguments]`.

launch/torchrun.sh runs this in place of torchrun. Plain torchrun has no SIGUSR1 handler: the
signal kills it (exit 138) and its workers train on unsupervised. Here SIGUSR1 sent to this
process -- the torchrun process, as `ps` shows it -- is relayed to every worker, which finishes its
step, checkpoints and exits 75 (train/resilience.py).

The signal is blocked (not ignored) from the start and the mask is inherited by the workers, so a
SIGUSR1 that lands while a worker is still starting stays pending until PreemptionHandler.install()
unblocks it: it neither kills the worker (the default action) nor is lost (an ignored signal is).
One thread waits for it with sigwait; torchrun runs unchanged in the main thread."""

import os
import signal
import sys
import threading

RELAYED = signal.SIGUSR1


def child_pids(parent: int):
    """Direct children of `parent` (a /proc scan, as launch/lib.sh's child_pids)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces
        if len(fields) > 1 and fields[1] == str(parent):
            yield int(entry)


def _relay_forever() -> None:
    while True:
        signal.sigwait({RELAYED})
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, RELAYED)
            except ProcessLookupError:
                pass
        print("[sparsetron agent] SIGUSR1 relayed to the workers", file=sys.stderr, flush=True)


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {RELAYED})  # first: no window where the default action kills
    signal.signal(RELAYED, signal.SIG_DFL)  # torchrun.sh starts us with it ignored; ignored = discarded
    threading.Thread(target=_relay_forever, name="sigusr1-relay", daemon=True).start()
    from torch.distributed.run import main as torchrun_main

    sys.argv[0] = "torchrun"
    torchrun_main()


if __name__ == "__main__":
    main()
