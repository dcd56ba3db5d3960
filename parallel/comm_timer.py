"""Seconds a rank spends in torch.distributed communication per training step.

Off unless SPARSETRON_COMM_TIMER=1: a normal run never patches anything and pays nothing.
When on, `install()` wraps the Python collectives of torch.distributed (all_reduce,
reduce_scatter_tensor, all_gather_into_tensor, all_gather, reduce_scatter, all_to_all_single,
all_to_all, broadcast, reduce, gather, scatter, barrier, send, recv, isend, irecv,
batch_isend_irecv) so that each call adds its interval [start, end] to a timer;
`comm_seconds_and_reset()` returns the union of the intervals since the last reset (overlapping
intervals are counted once) and clears them.

What a number means - the time this rank was *blocked* in communication:
- Blocking calls (gloo, or NCCL with the sync below): the wall time of the call. It includes
  waiting for slower peers (load imbalance, pipeline bubbles: a PP stage blocked in recv waits
  for the previous stage's compute), so it is "exposed communication + synchronisation", not
  wire time.
- Async calls (async_op=True, isend/irecv, batch_isend_irecv): the launch, plus the time spent
  in the returned Work's wait() (the Work is proxied). Completion observed only through
  Work.get_future() is not counted (DDP's comm hook below is the one such user we time).
- DDP: its reducer launches the bucket all-reduces from C++ during backward, so wrapping Python
  functions would miss them. `attach_ddp` registers a comm hook (the default allreduce hook,
  wrapped) whose future records [launch, completion] of every bucket. These intervals overlap
  the backward compute, so for DDP comm_s is the time with at least one gradient all-reduce in
  flight (overlapped or not), plus the blocking calls.
- Not counted: torch.distributed._functional_collectives / DTensor ops (C++ dispatch; no engine
  here uses them), object collectives' pickling, and anything called before `install()` through
  a reference taken earlier outside the modules patched (torch.distributed, distributed_c10d,
  and module-level aliases in sparsetron.* and deepspeed.*, which `install` rebinds).
- GPU (NCCL): collectives return once enqueued, so the timer synchronises the device before and
  after each blocking call and around each wait(). Cost: two cudaDeviceSynchronize per
  collective, and it removes comm/compute overlap - step times measured with the timer on are
  an upper bound; read comm_s as "collective time if serialised". CPU (gloo): no sync, two
  perf_counter calls and a lock per call (~1 us); step times are unaffected.

Only the rank that logs (rank 0) reports its own number; other ranks may differ (PP stages).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

ENV = "SPARSETRON_COMM_TIMER"
# all_gather_single / reduce_scatter_single: the names newer torch gives the tensor collectives
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_single", "all_gather", "reduce_scatter",
               "all_to_all_single", "all_to_all", "broadcast", "reduce", "gather", "scatter", "barrier",
               "send", "recv", "isend", "irecv", "batch_isend_irecv")
ALIAS_PREFIXES = ("sparsetron.", "deepspeed.")  # modules whose `from torch.distributed import x` aliases we rebind


def enabled_from_env() -> bool:
    value = os.environ.get(ENV, "0").strip().lower()
    if value not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{ENV}={value!r}: use 1 (time communication) or 0 (off)")
    return value in ("1", "true", "yes", "on")


def union_seconds(intervals: List[Tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class CommTimer:
    def __init__(self, sync_cuda: bool):
        self.sync_cuda = sync_cuda
        self._lock = threading.Lock()
        self._intervals: List[Tuple[float, float, str]] = []  # (start, end, collective name)
        self._local = threading.local()  # nesting depth: a collective built from others counts once
        self.calls = 0

    # -- bookkeeping
    def add(self, start: float, end: float, op: str = "other") -> None:
        with self._lock:
            self._intervals.append((start, end, op))
            self.calls += 1

    def reset(self) -> None:
        with self._lock:
            self._intervals = []

    def seconds_and_reset(self) -> float:
        return self.breakdown_and_reset()[0]

    def breakdown_and_reset(self) -> Tuple[float, Dict[str, float]]:
        """(union seconds of every interval, {collective: union seconds of its intervals})."""
        with self._lock:
            intervals, self._intervals = self._intervals, []
        by_op: Dict[str, List[Tuple[float, float]]] = {}
        for start, end, op in intervals:
            by_op.setdefault(op, []).append((start, end))
        return union_seconds([(a, b) for a, b, _ in intervals]), {op: union_seconds(iv) for op, iv in by_op.items()}

    def _sync(self) -> None:
        if self.sync_cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def nested(self):
        timer = self

        class _Nested:
            def __enter__(self):
                timer._local.depth = timer._depth() + 1

            def __exit__(self, *exc):
                timer._local.depth -= 1

        return _Nested()

    # -- wrappers
    def wrap(self, fn: Callable) -> Callable:
        op = fn.__name__

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth():  # inside another timed call (e.g. isend inside batch_isend_irecv)
                return fn(*args, **kwargs)
            self._sync()
            start = time.perf_counter()
            with self.nested():
                out = fn(*args, **kwargs)
            self._sync()
            self.add(start, time.perf_counter(), op)
            if isinstance(out, list) and out and all(hasattr(w, "wait") for w in out):
                return [_TimedWork(w, self, op) for w in out]  # batch_isend_irecv
            if out is not None and hasattr(out, "wait"):
                return _TimedWork(out, self, op)
            return out

        timed.__sparsetron_comm_timer__ = fn
        return timed

    def ddp_hook(self):
        """A DDP comm hook: the default all-reduce (average over the group), timed launch -> done."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(process_group, bucket):
            start = time.perf_counter()
            with self.nested():  # the hook's own dist.all_reduce is this interval, not another one
                fut = default_hooks.allreduce_hook(process_group, bucket)

            def done(f):
                self.add(start, time.perf_counter(), "all_reduce")
                return f.value()[0] if isinstance(f.value(), list) else f.value()

            return fut.then(done)

        return hook


class _TimedWork:
    """Proxy of a c10d Work whose wait() is timed; everything else goes to the real Work."""

    __slots__ = ("_work", "_timer", "_op")

    def __init__(self, work, timer: CommTimer, op: str):
        self._work, self._timer, self._op = work, timer, op

    def wait(self, *args, **kwargs):
        self._timer._sync()
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        self._timer._sync()
        self._timer.add(start, time.perf_counter(), self._op)
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


# ------------------------------------------------------------------------------------ install
_TIMER: Optional[CommTimer] = None
_PATCHED: List[Tuple[object, str, Callable]] = []  # (namespace, name, original) to restore


def install(sync_cuda: Optional[bool] = None) -> CommTimer:
    """Patch the collectives (idempotent) and return the process-wide timer."""
    global _TIMER
    if _TIMER is not None:
        return _TIMER
    import torch.distributed.distributed_c10d as c10d

    timer = CommTimer(torch.cuda.is_available() if sync_cuda is None else sync_cuda)
    originals = {name: getattr(c10d, name) for name in COLLECTIVES if hasattr(c10d, name)}
    wrapped = {name: timer.wrap(fn) for name, fn in originals.items()}
    by_id = {id(fn): wrapped[name] for name, fn in originals.items()}
    # c10d's own globals too: P2POp checks `op in [isend, irecv]` against them.
    namespaces = [dist, c10d] + [m for name, m in list(sys.modules.items())
                                 if m is not None and name.startswith(ALIAS_PREFIXES)]
    for ns in namespaces:
        for name, value in list(vars(ns).items()):
            if callable(value) and id(value) in by_id:
                _PATCHED.append((ns, name, value))
                setattr(ns, name, by_id[id(value)])
    _TIMER = timer
    return timer


def uninstall() -> None:
    """Restore every patched function (tests)."""
    global _TIMER
    while _PATCHED:
        ns, name, original = _PATCHED.pop()
        setattr(ns, name, original)
    _TIMER = None


def comm_seconds_and_reset() -> float:
    """Seconds blocked in communication since the last reset (0.0 when the timer is not installed)."""
    return _TIMER.seconds_and_reset() if _TIMER is not None else 0.0


def attach_ddp(module) -> bool:
    """Time a DistributedDataParallel module's gradient all-reduces (call before its first backward)."""
    from torch.nn.parallel import DistributedDataParallel

    if _TIMER is None or not isinstance(module, DistributedDataParallel):
        return False
    module.register_comm_hook(module.process_group, _TIMER.ddp_hook())
    return True


class StepCommTimer:
    """What the trainer uses: `reset()` at the start of a step, `record()` -> {"comm_s": s} after it
    ({} when SPARSETRON_COMM_TIMER is off)."""

    def __init__(self, active: bool):
        self.active = active

    @classmethod
    def from_env(cls, engine=None) -> "StepCommTimer":
        if not enabled_from_env():
            return cls(False)
        install()
        attach_ddp(getattr(engine, "wrapped", None))
        return cls(True)

    def reset(self) -> None:
        if self.active:
            comm_seconds_and_reset()

    def record(self) -> Dict[str, float]:
        """{"comm_s": total, "comm_s.<collective>": its share, ...} (e.g. comm_s.all_to_all_single for
        MoE dispatch/combine); the parts can sum to more than the total where collectives overlap."""
        if not self.active or _TIMER is None:
            return {"comm_s": 0.0} if self.active else {}
        total, by_op = _TIMER.breakdown_and_reset()
        return {"comm_s": total, **{f"comm_s.{op}": s for op, s in sorted(by_op.items())}}


__all__ = ["ENV", "CommTimer", "StepCommTimer", "attach_ddp", "comm_seconds_and_reset", "enabled_from_env",
           "install", "uninstall", "union_seconds"]
