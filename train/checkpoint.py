"""Checkpoints: model (safetensors), optimizer, trainer state, sampler position, RNG, config.

Atomic: everything is written into a hidden temp directory, fsynced, and renamed to
`step_XXXXXXXX` in one step. The last file written is the COMPLETE marker, which holds a
manifest: every file's size and checksum (xxh3-64; zlib crc32 where xxhash is not installed),
over every rank's shards. A directory counts only if the marker is there; it is *verified* only
if every listed file has its recorded size and checksum. A crash mid-write therefore leaves the
previous checkpoint as the latest valid one, and bytes changed after the write (a bad disk, a
stray `dd`, a truncated copy) are found before they are loaded. Markers written before the
manifest existed ("step N") still load, unverified. Loading never unpickles arbitrary objects:
safetensors for weights, torch.load(weights_only=True) for the rest."""

import errno
import json
import mmap
import os
import re
import shutil
import uuid
import zlib
from typing import Callable, Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:  # ~30 GB/s on one core (xxh3); crc32 ~7 GB/s (measured on the dev CPU, see README "Reliability")
    import xxhash
except ImportError:  # a trimmed image: still checksummed, a bit slower
    xxhash = None

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = "sparsetron-manifest/1"
HASH = "xxh3_64" if xxhash is not None else "crc32"
IO_EXIT_CODE = 74  # EX_IOERR (sysexits.h): a save failed (disk full, read-only, no permission)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-step_"
_CHUNK = 64 << 20


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; names the file and what is wrong."""


class CheckpointWriteError(CheckpointError):
    """A save failed for an I/O reason (disk full, read-only file system, permissions): the run stops
    with IO_EXIT_CODE, distinct from a crash (1) and a config error (2); nothing half-written is kept."""

    exit_code = IO_EXIT_CODE


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def unique_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): keep the first name of each tensor."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


# ------------------------------------------------------------------------------- I/O errors
_IO_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def io_cause(directory: str, err: BaseException) -> Optional[str]:
    """'no space left on device (ENOSPC)' etc. when `err` is an I/O failure, else None. torch.save and
    safetensors do not raise OSError on a full disk (torch: 'unexpected pos ...'), so their messages
    are matched and, failing that, the directory is probed (free space, writability)."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None:
        text = str(err)
        m = re.search(r"\bcode:\s*(\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
        if m:
            code = int(m.group(1))
        elif "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            code = _probe(directory) or errno.ENOSPC
        elif not isinstance(err, OSError):
            return None
    if code not in _IO_ERRNOS and isinstance(err, OSError):
        return f"{err.strerror or err} ({errno.errorcode.get(code, code)})"
    if code not in _IO_ERRNOS:
        return None
    return f"{_IO_ERRNOS[code]} ({errno.errorcode[code]})"


def _probe(directory: str) -> Optional[int]:
    try:
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    except OSError:
        return None
    return None if os.access(directory, os.W_OK) else errno.EACCES


def _write_error(path: str, err: BaseException) -> BaseException:
    cause = io_cause(os.path.dirname(path) or ".", err)
    if cause is None:
        return err
    return CheckpointWriteError(f"cannot write checkpoint file {path}: {cause}")


def write_files(directory: str, files: Dict[str, object]) -> None:
    """Write each entry by its kind: *.safetensors (tensor dict), *.pt (torch.save), *.json, text.
    An I/O failure (disk full, read-only, permissions) becomes a CheckpointWriteError naming the file."""
    for name, payload in files.items():
        path = os.path.join(directory, name)
        try:
            _write_one(path, name, payload)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise _write_error(path, err) from err


def _write_one(path: str, name: str, payload) -> None:
    if name.endswith(".safetensors"):
        save_file(payload, path)
    elif name.endswith(".pt"):
        torch.save(payload, path)
    elif name.endswith(".json"):
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
    else:
        with open(path, "w") as f:
            f.write(payload)
    _fsync_file(path)


# ---------------------------------------------------------------------------------- manifest
def file_digest(path: str, algorithm: str = HASH) -> str:
    """Checksum of a file, hashed through mmap in 64 MiB slices."""
    if algorithm == "xxh3_64":
        if xxhash is None:
            raise CheckpointError(f"{path}: the manifest uses xxh3_64 checksums; pip install xxhash to verify it")
        h = xxhash.xxh3_64()
        update = h.update
    elif algorithm == "crc32":
        crc = [0]
        update = lambda data: crc.__setitem__(0, zlib.crc32(data, crc[0]))  # noqa: E731
    else:
        raise CheckpointError(f"{path}: unknown checksum algorithm {algorithm!r} in the manifest")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:  # mmap: no copy into a Python buffer (2x the read()+hash throughput, measured)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for offset in range(0, size, _CHUNK):
                        update(view[offset:offset + _CHUNK])
                finally:
                    view.release()
    return h.hexdigest() if algorithm == "xxh3_64" else f"{crc[0]:08x}"


def _list_files(directory: str) -> Dict[str, int]:
    """Relative path -> size of every file below `directory` except the marker."""
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            if rel != COMPLETE:
                out[rel] = os.path.getsize(path)
    return out


def _my_share(sizes: Dict[str, int], rank: int, world: int) -> List[str]:
    """Files this rank hashes: largest first, dealt round-robin so the ranks share the reading."""
    ordered = sorted(sizes, key=lambda n: (-sizes[n], n))
    return ordered[rank::world]


def _rank_world(runtime) -> tuple:
    if runtime is not None and runtime.distributed:
        return runtime.rank, runtime.world_size
    return 0, 1


def build_manifest(directory: str, step: int, run_id: str = "", runtime=None) -> Optional[dict]:
    """Collective with a distributed runtime: every rank hashes a share of the files. The manifest on
    rank 0 (None elsewhere)."""
    rank, world = _rank_world(runtime)
    sizes = _list_files(directory) if rank == 0 else None
    if world > 1:
        sizes = _broadcast_obj(sizes)
    mine, error = {}, None
    try:
        for name in _my_share(sizes, rank, world):
            mine[name] = [sizes[name], file_digest(os.path.join(directory, name))]
    except OSError as err:
        error = f"{directory}: cannot read back {err.filename or ''} to checksum it ({err.strerror})"
    parts = _all_gather_obj((mine, error)) if world > 1 else [(mine, error)]
    errors = [e for _, e in parts if e]
    if errors:
        raise CheckpointWriteError(errors[0])
    if rank != 0:
        return None
    files = {}
    for part, _ in parts:
        files.update(part)
    return {"format": MANIFEST_FORMAT, "step": step, "run_id": run_id, "algorithm": HASH,
            "files": dict(sorted(files.items()))}


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest in the marker; None for a marker written before manifests existed ("step N")."""
    path = os.path.join(directory, COMPLETE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {COMPLETE} marker); "
                              f"it was not fully written") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    if raw.lstrip()[:1] != b"{":
        if re.fullmatch(rb"(step \d+|converted)\s*", raw):
            return None  # legacy marker
        raise CheckpointError(f"{path}: the marker is corrupt (neither a manifest nor a legacy 'step N' line)")
    try:
        manifest = json.loads(raw.decode())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: the manifest is corrupt ({err})") from None
    return manifest


def _check_files(directory: str, manifest: dict, names: List[str]) -> List[str]:
    problems = []
    for name in names:
        size, digest = manifest["files"][name]
        path = os.path.join(directory, name)
        try:
            actual = os.path.getsize(path)
            if actual != size:
                problems.append(f"{name} has {actual} bytes, the manifest records {size} (truncated or replaced)")
            elif file_digest(path, manifest["algorithm"]) != digest:
                problems.append(f"{name}: checksum mismatch (its bytes changed after the checkpoint was written)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as err:
            problems.append(f"{name}: cannot read ({err.strerror})")
    return problems


def verify(directory: str, runtime=None) -> bool:
    """Check every file of the manifest (size, then checksum). Returns False for a legacy checkpoint
    (nothing to verify against), True when verified; raises CheckpointError naming the first bad file.
    Collective with a distributed runtime: the ranks share the reading and all get the same answer."""
    rank, world = _rank_world(runtime)
    problem, manifest = None, None
    try:
        manifest = read_manifest(directory)
    except CheckpointError as err:
        problem = str(err)
    if world > 1:  # every rank reads the same marker; agree anyway (a flaky shared file system)
        problem = next((p for p in _all_gather_obj(problem) if p), None)
    if problem:
        raise CheckpointError(problem)
    if manifest is None:
        return False
    sizes = {name: entry[0] for name, entry in manifest["files"].items()}
    try:
        problems = _check_files(directory, manifest, _my_share(sizes, rank, world))
    except CheckpointError as err:  # e.g. xxhash missing: the same on every rank
        problems = [str(err)]
    if world > 1:
        problems = sorted(p for part in _all_gather_obj(problems) for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{directory}: {problems[0]}{more}")
    return True


def newest_verified(root: str, runtime=None, say: Callable[[str], None] = print) -> Optional[str]:
    """resume=auto: the newest checkpoint under `root` that verifies. One line per skipped checkpoint
    (why); None if there is none at all; CheckpointError if there are some but none verifies (never
    silently start over next to a run's damaged history). Collective: all ranks pick the same step."""
    candidates = list_complete(root)
    if runtime is not None and runtime.distributed:
        candidates = _broadcast_obj(candidates)
    skipped = []
    for path in reversed(candidates):
        try:
            if not verify(path, runtime):
                say(f"sparsetron: {path} has a legacy COMPLETE marker (no checksums); loading it unverified")
            return path
        except CheckpointError as err:
            skipped.append(path)
            say(f"sparsetron: skipping checkpoint {os.path.basename(path)}: {err}")
    if skipped:
        raise CheckpointError(f"{root}: none of the {len(skipped)} checkpoints verifies (see the lines above); "
                              f"restore one, or start over with resume=none overwrite=true")
    return None


# -------------------------------------------------------------------------------------- save
def save(root: str, step: int, files: Dict[str, object], keep_last: int, runtime=None,
         rank_writer: Optional[Callable[[str], None]] = None, run_id: Optional[str] = None) -> str:
    """Atomically write checkpoint `step` under `root`; prune old ones. Returns its path.

    `files` are written by the main rank. With a distributed `runtime`, this is collective: rank 0
    creates the temp dir, every rank runs `rank_writer(temp_dir)` (its shards), all ranks agree
    that every write succeeded, they checksum the files together, and only then rank 0 writes the
    manifest (COMPLETE) and renames. A failure on any rank removes the temp dir and raises on every
    rank (CheckpointWriteError for disk full / read-only / permissions); the previous checkpoint stays.
    `run_id` names the temp dir, so pruning clears only this run's crashed writes."""
    distributed = runtime is not None and runtime.distributed
    is_main = runtime is None or runtime.is_main
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f"{_TMP_PREFIX}{step:08d}-{run_id or 'x'}-{uuid.uuid4().hex[:8]}")
    if distributed:
        tmp = _broadcast_obj(tmp)
    error: Optional[BaseException] = None
    if is_main:
        try:
            os.makedirs(root, exist_ok=True)
            os.makedirs(tmp)
        except OSError as err:
            error = _write_error(tmp, err)
    _agree(distributed, error, final, tmp, is_main)
    try:
        if rank_writer is not None:
            rank_writer(tmp)
        if is_main:
            write_files(tmp, files)
    except BaseException as err:  # noqa: BLE001 (re-raised below, after the ranks agree)
        error = _write_error(tmp, err) if isinstance(err, (OSError, RuntimeError, SafetensorError)) else err
    _agree(distributed, error, final, tmp, is_main)
    try:
        manifest = build_manifest(tmp, step, run_id or "", runtime)
    except CheckpointWriteError:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        try:
            write_files(tmp, {COMPLETE: json.dumps(manifest, indent=1) + "\n"})  # last, fsynced
            _fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # re-saving a step (a resumed run, or one that walked back): replace it,
                old = f"{tmp}-replaced"  # renamed away first, so a crash here never leaves no step dir at all
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as err:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            error = _write_error(final, err) if isinstance(err, (OSError, RuntimeError)) else err
    _agree(distributed, error, final, tmp, is_main)
    if is_main:
        prune(root, keep_last, upto_step=step, run_id=run_id)
    if distributed:
        runtime.barrier()
    return final


def _agree(distributed: bool, error: Optional[BaseException], final: str, tmp: str, is_main: bool) -> None:
    """Raise on every rank if any rank failed (the temp dir removed by rank 0); the failing rank
    raises its own error, the others one naming the step, with the same exit code."""
    if distributed:
        reasons = _all_gather_obj(None if error is None else (str(error), getattr(error, "exit_code", None)))
        failed = [r for r in reasons if r is not None]
        if not failed:
            return
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        reason, code = failed[0]
        cls = CheckpointWriteError if code == IO_EXIT_CODE else CheckpointError
        raise cls(f"{final} not saved: another rank failed: {reason}")
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error


def _broadcast_obj(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_obj(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def list_complete(root: str) -> List[str]:
    """Checkpoints with a COMPLETE marker under root (manifest or legacy; not yet verified), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, COMPLETE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest(root: str) -> Optional[str]:
    complete = list_complete(root)
    return complete[-1] if complete else None


def prune(root: str, keep_last: int, upto_step: Optional[int] = None, run_id: Optional[str] = None) -> None:
    """Delete all but the newest `keep_last` checkpoints at or below `upto_step` (the one just saved,
    which verified as it was written). Newer ones are left alone: they are what a run that walked back
    past a damaged checkpoint has not reached again (that save replaces them). Temp dirs of crashed
    writes are removed only when they carry this `run_id` (all of them when run_id is None)."""
    if not os.path.isdir(root):
        return
    complete = list_complete(root)
    if upto_step is not None:
        complete = [p for p in complete if _step_of(p) <= upto_step]
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(_TMP_PREFIX) and (run_id is None or f"-{run_id}-" in name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ------------------------------------------------------------------------------------ reading
def read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON and undecodable bytes (UnicodeDecodeError)
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {str(err)[:160]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_tensors(directory: str, name: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(directory, name)
    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def read_torch(directory: str, name: str, map_location="cpu"):
    path = os.path.join(directory, name)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle/zip/EOF errors of several kinds: all mean the file is unusable
        raise CheckpointError(f"{path}: cannot load ({type(err).__name__}: {err})") from None


def check_complete(directory: str) -> None:
    """The marker is there (cheap; `verify` also checks every file)."""
    read_manifest(directory)


# the model fields a checkpoint records and a resume / init_from must match
MODEL_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp", "tie_embeddings")


def check_model_config(directory: str, saved: dict, current: dict) -> None:
    for key in MODEL_SHAPE_KEYS:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"{directory}: saved with model.{key}={saved[key]!r} but this run has model.{key}={current.get(key)!r}"
            )


def load_model_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_tied_alias(model, k)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    return key == "head.weight" and getattr(getattr(model, "cfg", None), "tie_embeddings", False)
