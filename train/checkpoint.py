"""Checkpoints: model (safetensors), optimizer, trainer state, sampler position, RNG, config.

Atomic: everything is written into a hidden temp directory, fsynced, and renamed to
`step_XXXXXXXX` in one step; a directory counts only if its COMPLETE marker is there. A crash
mid-write therefore leaves the previous checkpoint as the latest valid one. Loading never
unpickles arbitrary objects: safetensors for weights, torch.load(weights_only=True) for the rest."""

import json
import os
import re
import shutil
import uuid
from typing import Callable, Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; names the file and what is wrong."""


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


def write_files(directory: str, files: Dict[str, object]) -> None:
    """Write each entry by its kind: *.safetensors (tensor dict), *.pt (torch.save), *.json, text."""
    for name, payload in files.items():
        path = os.path.join(directory, name)
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


def save(root: str, step: int, files: Dict[str, object], keep_last: int, runtime=None,
         rank_writer: Optional[Callable[[str], None]] = None) -> str:
    """Atomically write checkpoint `step` under `root`; prune old ones. Returns its path.

    `files` are written by the main rank. With a distributed `runtime`, this is collective: rank 0
    creates the temp dir, every rank runs `rank_writer(temp_dir)` (its shards), all ranks agree
    that every write succeeded, and only then rank 0 writes COMPLETE and renames. A failure on
    any rank removes the temp dir everywhere and raises on every rank."""
    distributed = runtime is not None and runtime.distributed
    is_main = runtime is None or runtime.is_main
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}-{uuid.uuid4().hex[:8]}")
    if distributed:
        tmp = _broadcast_str(tmp)
    if is_main:
        os.makedirs(root, exist_ok=True)
        os.makedirs(tmp)
    if distributed:
        runtime.barrier()
    error: Optional[BaseException] = None
    try:
        if rank_writer is not None:
            rank_writer(tmp)
        if is_main:
            write_files(tmp, files)
    except BaseException as err:  # noqa: BLE001 (re-raised below, after the ranks agree)
        error = err
    if distributed and not _all_ok(error is None):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"{final}: another rank failed while writing its shards; nothing was committed")
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error
    if is_main:
        try:
            write_files(tmp, {COMPLETE: f"step {step}\n"})
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step (e.g. a resumed run): replace the old copy
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prune(root, keep_last)
    if distributed:
        runtime.barrier()
    return final


def _broadcast_str(value: str) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def list_complete(root: str) -> List[str]:
    """Complete checkpoints under root, oldest first."""
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


def prune(root: str, keep_last: int) -> None:
    for path in list_complete(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):  # temp dirs of crashed writers
        if name.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None


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
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(directory, COMPLETE)):
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {COMPLETE} marker); it was not fully written")


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
