"""Who owns a run directory: an exclusive lock for the whole run, the run's identity, what a new run
may do to an old one, and an I/O preflight (writable, room for a checkpoint).

`claim` (collective; rank 0 does the file work, every rank gets the same verdict) runs before the
data is built or anything is written into the run dir:

- Lock: rank 0 holds `fcntl.flock` on `<run_dir>/run.lock` until the run ends (the kernel drops it
  if the process dies). The file says who holds it (host, pid, start time), so a refused run can
  name the holder; a file naming a pid that is gone on this host is stale and is taken over.
- Identity: `run.json` holds the run id. A new run (resume=none) on a dir holding checkpoints or
  metrics is refused; `overwrite=true` moves the old run aside (`<run_dir>.replaced-<time>`), never
  deletes it. So metrics.jsonl, wandb_id.txt and tokenizer.json are only ever reused by a resume.
- Preflight: run dir and checkpoint dir writable; free space compared with an estimate of one
  checkpoint (refuse below one, warn below two)."""

import datetime
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

from .checkpoint import IO_EXIT_CODE, io_cause, list_complete

LOCK_NAME = "run.lock"
IDENTITY = "run.json"
# Left where they are when a run is moved aside: the lock (held now), Hydra's files for this launch,
# and the stack-dump files this process already has open.
_KEEP_IN_PLACE = {LOCK_NAME, ".hydra", "stacks"}
# Written by a run before its first metric: reused only by a resume.
_RUN_STATE = ("tokenizer.json", "wandb_id.txt", IDENTITY, "config.yaml")


class RunDirError(ValueError):
    """The run dir cannot be used as asked (held by another run, holds an old run, ...). Exit 2."""

    exit_code = 2


class RunDirSpaceError(RunDirError):
    """Not writable, or no room for one checkpoint: an I/O problem, exit IO_EXIT_CODE."""

    exit_code = IO_EXIT_CODE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another run that is still starting (its lock file names no holder yet)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, "
            f"run id {holder.get('run_id') or '?'})")


class RunLock:
    """An exclusive flock on <run_dir>/run.lock, with the holder written inside."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def _holder(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 4096)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self, say: Callable[[str], None] = print) -> "RunLock":
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirSpaceError(f"run dir {self.run_dir}: cannot create {LOCK_NAME}: "
                                   f"{io_cause(self.run_dir, err) or err}") from None
        host = socket.gethostname()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                raise RunDirError(f"run dir {self.run_dir}: the file system still holds a lock for "
                                  f"{_describe(holder)}, which is gone (a stale NFS lock?); delete {self.path} "
                                  f"if no run uses this dir") from None
            raise RunDirError(f"run dir {self.run_dir} is in use by {_describe(holder)}; wait for that run to end, "
                              f"or use another name (lock file {self.path})") from None
        except OSError as err:  # ENOLCK / EOPNOTSUPP: a file system without flock; the holder check still runs
            locked = False
            say(f"sparsetron: warning: cannot lock {self.path} ({err.strerror}); relying on the holder check")
        holder = self._holder(fd)
        pid = holder.get("pid")
        if holder and isinstance(pid, int) and pid != os.getpid():
            if holder.get("host") == host and _pid_alive(pid) and not locked:
                os.close(fd)
                raise RunDirError(f"run dir {self.run_dir} is in use by {_describe(holder)}; wait for that run "
                                  f"to end, or use another name (lock file {self.path})")
            say(f"sparsetron: taking over the stale lock of {_describe(holder)} on {self.run_dir}")
        self.fd = fd
        return self

    def write_holder(self, run_id: str) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, (json.dumps(info) + "\n").encode())
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean end leaves no holder to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------------- identity
def previous_run(run_dir: str, ckpt_root: str) -> List[str]:
    """What of an earlier run is in the dir: its checkpoints and metrics ([] if none)."""
    found = []
    checkpoints = list_complete(ckpt_root)
    entries = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    partial = [n for n in entries if n.startswith(("step_", ".tmp-step_"))]
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), newest {os.path.basename(checkpoints[-1])}")
    elif partial:
        found.append(f"{len(partial)} unfinished checkpoint dir(s)")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    return found


def _aside_name(path: str) -> str:
    base = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while os.path.exists(name):
        n += 1
        name = f"{base}-{n}"
    return name


def move_aside(run_dir: str, ckpt_root: str, names: Optional[List[str]] = None) -> str:
    """Move the old run's files (all, or `names`) into a sibling `<run_dir>.replaced-<time>`; a checkpoint
    dir outside the run dir gets its own sibling. Renames only: nothing is copied or deleted."""
    dest = _aside_name(run_dir)
    os.makedirs(dest)
    inside = os.path.abspath(ckpt_root).startswith(os.path.abspath(run_dir) + os.sep)
    for name in sorted(os.listdir(run_dir)) if names is None else names:
        if name in _KEEP_IN_PLACE or name.endswith(".log") or not os.path.lexists(os.path.join(run_dir, name)):
            continue
        os.rename(os.path.join(run_dir, name), os.path.join(dest, name))
    if names is None and not inside and os.path.isdir(ckpt_root) and os.listdir(ckpt_root):
        os.rename(ckpt_root, _aside_name(ckpt_root))
    return dest


def _new_identity(run_dir: str, name: str) -> str:
    run_id = uuid.uuid4().hex[:12]
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {"run_id": run_id, "name": name, "created": created}
    path = os.path.join(run_dir, IDENTITY)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return run_id


def _read_identity(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, IDENTITY)) as f:
            run_id = json.load(f).get("run_id")
        return run_id if isinstance(run_id, str) and run_id.isalnum() else None
    except (OSError, ValueError, AttributeError):
        return None


def prepare(run_dir: str, ckpt_root: str, resume: str, overwrite: bool, name: str,
            say: Callable[[str], None] = print) -> str:
    """Apply the new-run / resume rules to the dir; returns the run id."""
    if overwrite and resume != "none":
        raise RunDirError(f"overwrite=true starts the run over and cannot be combined with resume={resume}; "
                          f"drop one of them")
    if resume != "none":  # continuing: keep the identity (a dir from before run.json gets one now)
        return _read_identity(run_dir) or _new_identity(run_dir, name)
    old = previous_run(run_dir, ckpt_root)
    if old and not overwrite:
        raise RunDirError(f"run dir {run_dir} already holds a run ({', '.join(old)}); use resume=auto to continue "
                          f"it, overwrite=true to replace it (the old run is moved aside), or another name")
    if old:
        dest = move_aside(run_dir, ckpt_root)
        say(f"sparsetron: overwrite=true: moved the previous run ({', '.join(old)}) to {dest}")
    else:  # files of a run that never logged a step: a new run must not inherit its tokenizer or wandb id
        leftovers = [n for n in _RUN_STATE if os.path.exists(os.path.join(run_dir, n))]
        if any(n in ("tokenizer.json", "wandb_id.txt") for n in leftovers):
            say(f"sparsetron: moved leftovers of an earlier start ({', '.join(leftovers)}) to "
                f"{move_aside(run_dir, ckpt_root, leftovers)}")
    return _new_identity(run_dir, name)


# -------------------------------------------------------------------------------- preflight
def checkpoint_bytes(cfg) -> int:
    """About one checkpoint: fp32 weights + two fp32 AdamW moments per parameter (+ 5 % and 1 MiB of
    metadata); DeepSpeed also writes its own copy of the weights next to the layout-free shards."""
    from .metrics import parameter_counts

    total = parameter_counts(cfg.model, cfg.attention, cfg.moe)["total"]
    per_param = 12 + (4 if cfg.parallel.zero_stage > 0 or cfg.parallel.offload_optimizer != "none" else 0)
    return int(total * per_param * 1.05) + (1 << 20)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def preflight(run_dir: str, ckpt_root: str, need: int, say: Callable[[str], None] = print) -> None:
    for label, path in (("run dir", run_dir), ("checkpoint dir", ckpt_root)):
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as err:
            raise RunDirSpaceError(f"{label} {path} is not writable: {io_cause(path, err) or err}") from None
    st = os.statvfs(ckpt_root)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise RunDirSpaceError(f"checkpoint dir {ckpt_root} has {_gib(free)} free, one checkpoint needs about "
                               f"{_gib(need)}; free space or set checkpoint.dir elsewhere")
    if free < 2 * need:
        say(f"sparsetron: warning: checkpoint dir {ckpt_root} has {_gib(free)} free, room for one checkpoint "
            f"(~{_gib(need)}) but not two: the next save may fail (keep_last needs both until the new one lands)")


# ------------------------------------------------------------------------------------ claim
@dataclass
class Claim:
    run_id: str
    lock: Optional[RunLock] = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(cfg, runtime, run_dir: str, ckpt_root: str) -> Claim:
    """Collective: lock, identity and preflight on rank 0; every rank gets the run id or the same error."""
    say = print if runtime.is_main else (lambda _line: None)
    verdict, lock, error = None, None, None
    if runtime.is_main:
        try:
            lock = RunLock(run_dir).acquire(say)
            preflight(run_dir, ckpt_root, checkpoint_bytes(cfg), say)
            run_id = prepare(run_dir, ckpt_root, cfg.resume, bool(cfg.get("overwrite", False)), cfg.name, say)
            lock.write_holder(run_id)
            verdict = ("ok", run_id)
        except BaseException as err:  # noqa: BLE001 (re-raised below after the other ranks hear of it)
            error = err
            verdict = ("error", type(err).__name__, getattr(err, "exit_code", None), str(err))
            if lock is not None:
                lock.release()
    if runtime.distributed:
        import torch.distributed as dist

        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if error is not None:
        raise error
    if verdict[0] == "error":
        _, kind, code, message = verdict
        cls = RunDirSpaceError if code == IO_EXIT_CODE else RunDirError
        raise cls(message if kind in ("RunDirError", "RunDirSpaceError") else f"rank 0 failed: {kind}: {message}")
    if lock is not None:
        _HELD[os.path.abspath(run_dir)] = lock
    return Claim(verdict[1], lock)


_HELD: dict = {}  # run dir -> the lock this process holds (released by `release` when train() ends)


def release(cfg) -> None:
    """Release this process's lock on cfg.run_dir, if it holds one (train() calls it however it ends)."""
    lock = _HELD.pop(os.path.abspath(os.path.expanduser(cfg.run_dir)), None)
    if lock is not None:
        lock.release()


__all__ = ["Claim", "release", "RunDirError", "RunDirSpaceError", "RunLock", "checkpoint_bytes", "claim", "move_aside",
           "prepare", "preflight", "previous_run"]
