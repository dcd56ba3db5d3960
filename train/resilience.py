"""Preemption and hang handling for long training runs (pure Python; torch only if present).

PreemptionHandler
    SIGUSR1/SIGTERM handlers that only set a flag. The trainer polls the flag after each
    step (all ranks agree through ``stop_agreed``), saves a checkpoint and exits with
    ``REQUEUE_EXIT_CODE``; launch/slurm.sbatch then runs ``scontrol requeue``.

Watchdog
    A daemon thread. The trainer calls ``beat(step)`` once per step and wraps collectives
    in ``with watchdog.collective("all_reduce grads"):``. With no beat for ``timeout_s``
    it reports "rank R hung in <name> at step S for T s" plus every thread's stack, then
    ends the process with ``WATCHDOG_EXIT_CODE`` via ``os._exit`` (a hung collective cannot
    be unwound by an exception). It also logs a heartbeat line every ``heartbeat_s``.

Limits: a Python thread needs the GIL, so a hang inside C code that holds the GIL is not
seen here; NCCL's own C++ watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, launch/env.sh) covers
that. CUDA collectives are asynchronous: a hang usually surfaces at the next sync point
(``loss.item()``, optimizer step), so wrap that point too.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO

log = logging.getLogger("sparsetron.resilience")

# 75 = EX_TEMPFAIL (sysexits.h): "temporary failure, retry later". Distinct from 1 (Python
# error), 124 (timeout(1)) and 128+N (killed by signal N). Shared with launch/lib.sh.
REQUEUE_EXIT_CODE = 75
# A rank found hung by the watchdog. Not requeued automatically: a hang is often a bad
# node, which a requeue may land on again.
WATCHDOG_EXIT_CODE = 86

# 65 = EX_DATAERR: train.max_skipped_steps optimizer steps in a row had a non-finite loss or gradient
# norm (a diverged run, or bad data), or a checkpoint would have held non-finite values. Not requeued:
# the same data and weights would diverge again.
DIVERGED_EXIT_CODE = 65

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_REQUESTED = 1000  # stop_agreed's vote for a programmatic stop (above every signal number)

# Asks a rank for its Python stacks (see enable_stack_dumps); not in DEFAULT_SIGNALS: it does not stop anything.
STACK_DUMP_SIGNAL = signal.SIGUSR2
_stack_files: list = []  # kept open for the handler's lifetime


def enable_stack_dumps(path: str) -> None:
    """On STACK_DUMP_SIGNAL, append every thread's Python stack to ``path``. faulthandler's handler
    is C code, so it also answers for a rank stuck in a GIL-holding CUDA/NCCL call, where the
    Watchdog thread cannot run (a hung pipeline rank on 4 GPUs never logged a heartbeat).
    benchmarks/scaling/run.py sends the signal to every worker before killing a timed-out launch."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stream = open(path, "a")
    faulthandler.register(STACK_DUMP_SIGNAL, file=stream, all_threads=True, chain=False)
    while _stack_files:  # a later trainer in the same process replaces the earlier one's file
        _stack_files.pop().close()
    _stack_files.append(stream)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r} must be > 0")
    return value


def dist_timeout(default_s: float = 1800.0) -> datetime.timedelta:
    """Collective timeout for ``init_process_group(timeout=...)``: SPARSETRON_DIST_TIMEOUT_S."""
    return datetime.timedelta(seconds=_env_float("SPARSETRON_DIST_TIMEOUT_S", default_s))


def _current_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class PreemptionHandler:
    """Turns preemption signals into a flag the training loop polls.

    Usage (main thread)::

        handler = PreemptionHandler().install()
        for step in ...:
            train_step()
            if handler.stop_agreed():          # same call on every rank, every step
                save_checkpoint(); exit_for_requeue()
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        if not self.signals:
            raise ValueError("signals must name at least one signal, e.g. (signal.SIGUSR1,)")
        self._flag = False
        self.received: Optional[int] = None  # first signal number seen
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        # signal.signal() only works in the main thread; fail loudly rather than never stop.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
            # SA_RESTART: a system call the signal lands in (gloo's socket I/O on this thread) resumes
            # instead of failing with EINTR; gloo dropped the connection on that, and the peer rank died
            # with "Connection closed by peer" instead of checkpointing. The flag is still seen next step.
            signal.siginterrupt(sig, False)
        # Blocked until now (defer_preemption_signals; launch/agent.py starts workers with SIGUSR1
        # blocked): one that arrived during start-up is delivered now instead of being lost. Only this
        # (main) thread unblocks: threads started earlier keep them blocked, so they land here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def stop_listening(self) -> None:
        """Ignore further preemption signals once the stop is decided: Slurm signals every
        process of the step and launch/torchrun.sh forwards the same signal, so a duplicate can
        land after uninstall() or during interpreter shutdown (which restores SIG_DFL for
        Python-level handlers) and kill the process mid-exit instead of letting it exit 75."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        # Only set the flag: the main thread may be anywhere (inside a collective, holding a
        # lock), so all real work happens when the loop next polls.
        if self.received is None:
            self.received = signum
        self._flag = True

    def request_stop(self) -> None:
        """Programmatic stop (tests, a max-wall-time check, ...)."""
        self._flag = True

    @property
    def should_stop(self) -> bool:
        """This rank's flag only; use ``stop_agreed`` when more than one rank runs."""
        return self._flag

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def stop_agreed(self, group=None) -> bool:
        """True on every rank if any rank got a signal (all_reduce MAX of the flag).

        Slurm may signal nodes at slightly different times; without agreement one rank
        would enter the checkpoint save while the others enter the next step's collectives
        and the job would deadlock. Every rank must call this at the same step. Without an
        initialized process group it returns the local flag.
        """
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            return self._flag
        if not (dist.is_available() and dist.is_initialized()):
            return self._flag
        backend = str(dist.get_backend(group)).lower()
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and torch.cuda.is_available()
            else torch.device("cpu")
        )
        # The signal number travels with the vote, so every rank reports the same signal (a rank that
        # got none would otherwise say "none"). _REQUESTED: request_stop() without a signal.
        mine = (self.received or _REQUESTED) if self._flag else 0
        flag = torch.tensor([mine], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        agreed = int(flag.item())
        if agreed:
            self._flag = True
            if self.received is None and agreed != _REQUESTED:
                self.received = agreed
        return self._flag


EXIT_STATUS_ENV = "SPARSETRON_EXIT_STATUS_FILE"


def note_exit_status(code: Optional[int]) -> None:
    """Append this worker's exit code to $SPARSETRON_EXIT_STATUS_FILE (set by launch/torchrun.sh):
    torchrun reports any failed worker as exit 1, so the wrapper reads the real reason here
    (75 requeue, 74 I/O, 65 diverged, 2 input)."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if not path or not code:
        return
    try:
        with open(path, "a") as f:
            f.write(f"{code}\n")
    except OSError:
        pass


def defer_preemption_signals(signals: Iterable[int] = DEFAULT_SIGNALS) -> set:
    """Block the preemption signals in the calling (main) thread until PreemptionHandler.install()
    unblocks them there; returns the previous mask (restore it with signal.pthread_sigmask).

    Call it before the process group and the engine start their threads (gloo's I/O loop, DeepSpeed's,
    the data prefetcher): a thread inherits its creator's mask, so those threads keep the signals
    blocked and the kernel delivers them to the main thread only. Delivered to a gloo thread, the
    signal interrupted a socket call and gloo dropped the connection ("Connection closed by peer")
    -- a preempted job crashed instead of checkpointing. A signal arriving meanwhile stays pending."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))


def exit_for_requeue(message: str = "checkpoint saved after preemption signal") -> None:
    """Tear down the process group and exit with REQUEUE_EXIT_CODE (never returns)."""
    log.warning("%s; exiting with %d for requeue", message, REQUEUE_EXIT_CODE)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(REQUEUE_EXIT_CODE)


class Watchdog:
    """Detects a rank that stopped making progress and ends it with a clear message."""

    def __init__(
        self,
        timeout_s: float = 900.0,
        heartbeat_s: float = 300.0,
        rank: Optional[int] = None,
        exit_code: int = WATCHDOG_EXIT_CODE,
        stream: Optional[TextIO] = None,
        logger: Optional[logging.Logger] = None,
        on_hang: Optional[Callable[[str], None]] = None,
        poll_s: Optional[float] = None,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0 seconds, got {heartbeat_s}")
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self._rank = rank
        self.exit_code = exit_code
        self.stream = stream  # None = sys.stderr at report time (tests may swap it)
        self.logger = logger or log
        self.on_hang = on_hang  # called with the message before exit (e.g. flush metrics)
        # Poll often enough to honour both periods with ~10% slack.
        self.poll_s = poll_s or max(0.01, min(1.0, self.timeout_s / 10, self.heartbeat_s / 10))
        self.step: Optional[int] = None
        self._last_beat = time.monotonic()
        self._beats = 0
        self._region: Optional[tuple[str, float]] = None  # (name, entered_at); one tuple = atomic swap
        self._last_region = "none"
        self._suspended = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_env(cls, **kwargs) -> "Watchdog":
        """Periods from SPARSETRON_WATCHDOG_TIMEOUT_S / SPARSETRON_HEARTBEAT_S (launch/env.sh)."""
        kwargs.setdefault("timeout_s", _env_float("SPARSETRON_WATCHDOG_TIMEOUT_S", 900.0))
        kwargs.setdefault("heartbeat_s", _env_float("SPARSETRON_HEARTBEAT_S", 300.0))
        return cls(**kwargs)

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else _current_rank()

    # --- called by the training loop -----------------------------------------------------
    def start(self) -> "Watchdog":
        if self._thread is not None:
            return self
        self._last_beat = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sparsetron-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s + 1)
            self._thread = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def beat(self, step: int) -> None:
        """Progress: call once per finished step (also before a long first step if wanted)."""
        self.step = step
        self._beats += 1
        self._last_beat = time.monotonic()

    @contextlib.contextmanager
    def collective(self, name: str) -> Iterator[None]:
        """Mark a region (a collective, a sync point, a checkpoint save) for hang reports."""
        outer = self._region
        self._region = (name, time.monotonic())
        try:
            yield
        finally:
            self._last_region = name
            self._region = outer

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No hang detection inside (e.g. an evaluation or save longer than timeout_s)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1
            self._last_beat = time.monotonic()

    # --- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        next_heartbeat = time.monotonic() + self.heartbeat_s
        beats_at_last_heartbeat = 0
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if not self._suspended and now - self._last_beat > self.timeout_s:
                self._report_hang(now)
                return
            if now >= next_heartbeat:
                region = self._region
                where = region[0] if region else "-"
                self._emit_heartbeat(
                    f"heartbeat rank={self.rank} step={self.step} "
                    f"steps_since_last={self._beats - beats_at_last_heartbeat} "
                    f"since_beat={now - self._last_beat:.1f}s in={where}"
                )
                beats_at_last_heartbeat = self._beats
                next_heartbeat = now + self.heartbeat_s

    def _emit_heartbeat(self, line: str) -> None:
        self.logger.info(line)
        if not self.logger.hasHandlers():
            self._write(line)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):  # closed stream at interpreter teardown
            pass

    def hang_message(self, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        region = self._region
        if region is not None:
            name, since = region
            where, stuck = name, now - since
        else:
            where = f"<no collective; last finished: {self._last_region}>"
            stuck = now - self._last_beat
        return f"rank {self.rank} hung in {where} at step {self.step} for {stuck:.1f} s"

    def _report_hang(self, now: float) -> None:
        message = self.hang_message(now) + f" (no step finished for {now - self._last_beat:.1f} s)"
        self._write(f"[sparsetron watchdog] {message}; exiting with {self.exit_code}")
        self.logger.error("%s; exiting with %d", message, self.exit_code)
        stream = self.stream or sys.stderr
        try:  # where every thread is stuck, for the post-mortem
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (OSError, ValueError, AttributeError):  # e.g. a StringIO has no fileno()
            pass
        if self.on_hang is not None:
            try:
                self.on_hang(message)
            except Exception:  # never let a callback block the exit
                pass
        for handler in logging.getLogger().handlers + self.logger.handlers:
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(self.exit_code)



class NullWatchdog:
    """Same calls as Watchdog, doing nothing: the default for engines run without one."""

    def beat(self, step: int) -> None:
        pass

    def collective(self, name: str):
        return contextlib.nullcontext()

    def suspended(self):
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- non-finite guard
class NonFiniteError(RuntimeError):
    """The run diverged (too many skipped steps) or its state is not finite: exit DIVERGED_EXIT_CODE."""

    exit_code = DIVERGED_EXIT_CODE


class SkipCounter:
    """Counts optimizer steps the engines skipped for a non-finite loss/gradient norm (the decision is
    parallel/engine.agree_finite, the same on every rank); stops the run after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0):
        if limit < 1:
            from sparsetron.configs.schema.validate import ConfigError

            raise ConfigError("train.max_skipped_steps", f"got {limit}, must be >= 1")
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, step: int, skipped: bool, loss: float, grad_norm: float, say: Callable[[str], None]) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        say(f"sparsetron: step {step}: non-finite loss={loss} grad_norm={grad_norm}; optimizer step skipped "
            f"({self.in_a_row} in a row, {self.total} in this run; the limit is train.max_skipped_steps={self.limit})")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} optimizer steps in a row (steps {step - self.in_a_row + 1}-{step}) "
                f"had a non-finite loss or gradient norm; stopping (train.max_skipped_steps={self.limit}). The "
                f"checkpoints hold finite weights only: lower optim.lr or check the data near step {step}, then "
                f"resume=auto")


# Test hook (tests/test_faults.py): SPARSETRON_FAULT_NAN_STEPS="7" or "7-11" or "3,9" makes the loss of
# those steps (1-based, as logged) NaN, through the model's final norm, on every rank. Read once at start.
FAULT_NAN_ENV = "SPARSETRON_FAULT_NAN_STEPS"


def nan_fault_steps(raw: Optional[str] = None) -> frozenset:
    raw = os.environ.get(FAULT_NAN_ENV, "") if raw is None else raw
    steps = set()
    try:
        for part in filter(None, raw.replace(" ", "").split(",")):
            lo, _, hi = part.partition("-")
            steps.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"{FAULT_NAN_ENV}={raw!r}: expected steps like 7, 7-11 or 3,9") from None
    return frozenset(steps)


@contextlib.contextmanager
def inject_nan(modules, active: bool) -> Iterator[None]:
    """While active, every module named exactly `norm` (the model's final norm) outputs NaN."""
    if not active:
        yield
        return
    handles = [m.register_forward_hook(lambda _m, _inp, out: out * float("nan"))
               for module in modules for name, m in module.named_modules() if name == "norm"]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
