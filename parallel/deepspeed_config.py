"""The DeepSpeed JSON, generated from the Hydra config (the user never writes it).

`parallel.deepspeed_overrides` is deep-merged last, so any key can be changed from the command
line, e.g. `+parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=5e7`; setting an
`optimizer` block there makes DeepSpeed build its own optimizer (DeepSpeedCPUAdam when the
optimizer is offloaded) instead of the client optimizer built by train/optim.py.

With offload, the knobs a user should not have to know (overlap, buckets, prefetch, sub groups, pinned
buffers) are chosen here from the model size and the host's memory (`offload_tuning`), and
`check_offload_fits` refuses, before any work, a layout whose model states cannot fit the host RAM or
the NVMe disk. Memory per parameter of a rank's ZeRO partition (DeepSpeed ZeRO-Offload/-Infinity):
fp32 master + Adam m + v = 12 B and the fp32 gradient 4 B on the host with offload_optimizer=cpu
(on disk instead, except the gradient, with nvme); the 16/32-bit parameter itself with offload_param."""

import copy
import os
import shutil
from typing import Any, Dict, Optional

import torch

GIB = 2**30
OPTIMIZER_STATE_B = 12  # fp32 master weight + Adam exp_avg + exp_avg_sq
FP32_GRAD_B = 4


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolved_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _offload(device: str, p, params: bool, pin: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        out["nvme_path"] = p.nvme_path
        if params:
            out["buffer_count"] = 5
    return out


# ------------------------------------------------------------------------ memory arithmetic
def param_bytes(cfg, device: torch.device) -> int:
    return 2 if resolved_precision(cfg.train.precision, device) == "bf16" else 4


def model_state_bytes(cfg, n_params: int, device: torch.device) -> Dict[str, int]:
    """Bytes of ZeRO model states that offload puts on the host and on the NVMe disk, for `n_params`
    partitioned parameters. Lower bounds: activations, buffers and the Python process are extra."""
    p = cfg.parallel
    host = disk = 0
    if p.offload_optimizer == "cpu":
        host += n_params * (OPTIMIZER_STATE_B + FP32_GRAD_B)
    elif p.offload_optimizer == "nvme":
        disk += n_params * OPTIMIZER_STATE_B
    if p.offload_param == "cpu":
        host += n_params * param_bytes(cfg, device)
    elif p.offload_param == "nvme":
        disk += n_params * param_bytes(cfg, device)
    return {"host": host, "disk": disk}


def host_available_bytes() -> Optional[int]:
    """MemAvailable, capped by a cgroup (container) limit; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def disk_available_bytes(path: str) -> Optional[int]:
    path = os.path.abspath(os.path.expanduser(path))
    while path and not os.path.exists(path):  # the offload dir is created later: ask its disk
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def offload_memory_estimate(cfg, n_params: int, world_size: int, local_world_size: int,
                            device: torch.device) -> Dict[str, int]:
    """Host RAM and disk one node needs for its ranks' share of the model states (ZeRO partitions the
    states over every rank, so a node holds local/world of them), and the trainer's host-side build of
    the full fp32 model per rank before the engine shards it (zero.Init is not used): the peak is the
    larger of the two."""
    per_node = model_state_bytes(cfg, n_params, device)
    share = local_world_size / max(world_size, 1)
    steady = int(per_node["host"] * share)
    build = local_world_size * 4 * n_params
    return {"host": max(steady, build), "host_states": steady, "host_build": build,
            "disk": int(per_node["disk"] * share)}


def check_offload_fits(cfg, n_params: int, world_size: int, local_world_size: Optional[int] = None,
                       host_available: Optional[int] = None, disk_available: Optional[int] = None) -> None:
    """One ConfigError, before any work, when the offloaded model states cannot fit this node's host
    RAM (or, for NVMe, the disk under parallel.nvme_path). `*_available` default to this machine."""
    from sparsetron.configs.schema.validate import ConfigError

    p = cfg.parallel
    if p.offload_optimizer == "none" and p.offload_param == "none":
        return
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    est = offload_memory_estimate(cfg, n_params, world_size, local, device)
    host = host_available if host_available is not None else host_available_bytes()
    field = "parallel.offload_param" if p.offload_param != "none" else "parallel.offload_optimizer"
    if host is not None and est["host"] > host:
        raise ConfigError(field, f"offload_optimizer={p.offload_optimizer} offload_param={p.offload_param} with "
                          f"{n_params / 1e9:.2f}B params needs {est['host']:,} bytes ({est['host'] / GIB:.1f} GiB) "
                          f"of host RAM on this node ({local} of {world_size} ranks: model states "
                          f"{est['host_states'] / GIB:.1f} GiB, fp32 model build {est['host_build'] / GIB:.1f} GiB); "
                          f"{host:,} bytes ({host / GIB:.1f} GiB) available. Use more nodes, NVMe offload "
                          f"(parallel.offload_optimizer=nvme parallel.offload_param=nvme) or a smaller model")
    if est["disk"]:
        disk = disk_available if disk_available is not None else disk_available_bytes(p.nvme_path)
        if disk is not None and est["disk"] > disk:
            raise ConfigError("parallel.nvme_path", f"NVMe offload of {n_params / 1e9:.2f}B params needs "
                              f"{est['disk']:,} bytes ({est['disk'] / GIB:.1f} GiB) on the disk of {p.nvme_path} "
                              f"for this node's {local} ranks; {disk:,} bytes ({disk / GIB:.1f} GiB) free there")


# ----------------------------------------------------------------------------- tuning
def _clamp(value: float, low: float, high: float) -> int:
    return int(min(max(value, low), high))


def offload_tuning(cfg, n_params: int, dp: int, device: torch.device, largest_param: int = 0,
                   host_available: Optional[int] = None, gpu_bytes: Optional[int] = None) -> Dict[str, Any]:
    """ZeRO keys for an offloaded run, from the size of this rank's model (`n_params`, its tensor-parallel
    shard) and the host's free memory. Why each:
    - overlap_comm / contiguous_gradients: reduce and copy gradients to the host while backward runs,
      into one contiguous buffer (no fragmentation): the offload's PCIe traffic hides behind compute.
    - reduce_bucket_size / stage3_prefetch_bucket_size: about one transformer block's parameters, so
      each gradient copy and each parameter fetch is one large transfer a block ahead; capped so the
      overlap buffers (~4.5 buckets of 16-bit values) take <= 2% of the GPU, floored at 5e6.
    - stage3_param_persistence_threshold = 10 x dim: norm weights (dim values) stay resident instead
      of being fetched every layer (Hugging Face's rule for DeepSpeed's 'auto').
    - stage3_max_live_parameters / max_reuse_distance >= 3 blocks: the current, the prefetched and
      the recomputed block (activation checkpointing) are never released in between.
    - sub_group_size: the optimizer steps this many parameters at a time; with NVMe the swapper pins
      buffer_count (4) fp32 buffers of one sub group, kept <= 1/8 of the free host RAM.
    - pin_memory (when parallel.pin_memory): page-locked host buffers for faster copies, but only
      when the host states take <= 75% of the free RAM (pinned pages cannot be reclaimed)."""
    p, m = cfg.parallel, cfg.model
    block = max(n_params / max(m.n_layers, 1), 1.0)
    cap = 5e8 if gpu_bytes is None else max(5e6, 0.02 * gpu_bytes / (4.5 * 2))
    bucket = _clamp(block, 5e6, cap)
    host_available = host_available_bytes() if host_available is None else host_available
    zero: Dict[str, Any] = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket}
    if p.zero_stage == 3:
        live = int(max(1e9, 3 * block))
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=10 * m.dim,
                    stage3_max_live_parameters=live, stage3_max_reuse_distance=live)
    sub_group = int(1e9)
    if p.offload_optimizer == "nvme" and host_available:
        sub_group = _clamp(host_available / 8 / (4 * 4), 1e7, 1e9)
    zero["sub_group_size"] = sub_group
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks sharing this host's RAM
    host_states = model_state_bytes(cfg, n_params, device)["host"] / max(dp, 1) * local_ranks
    pin = (bool(p.pin_memory) and device.type == "cuda"
           and (host_available is None or host_states <= 0.75 * host_available))
    zero["_pin_memory"] = pin
    if p.offload_param == "nvme" and largest_param:  # every parameter must fit one swap buffer
        zero["_param_buffer_size"] = max(int(1e8), int(largest_param))
    return zero


def host_threads_per_rank() -> Optional[int]:
    """Threads for the host-side Adam of each rank: the usable cores shared by this node's ranks. Only
    when torchrun's default OMP_NUM_THREADS=1 is in force (it sets 1 for multi-rank jobs unless the
    user chose a value): one thread per rank would leave most of the host idle during the CPU step.
    None: keep the current setting (one process, or the user's own OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS") != "1" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))
    return threads if threads > 1 else None


def offload_tuning_line(ds: Dict[str, Any], threads: Optional[int] = None) -> str:
    """The one line printed at start: what was chosen (any key can still be overridden with
    +parallel.deepspeed_overrides.zero_optimization.KEY=VALUE)."""
    z = ds["zero_optimization"]
    keys = ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold", "stage3_max_live_parameters", "sub_group_size")
    parts = [f"{k}={z[k]:.3g}" if isinstance(z[k], (int, float)) and not isinstance(z[k], bool) else f"{k}={z[k]}"
             for k in keys if k in z]
    pins = [f"{name}.pin_memory={z[name]['pin_memory']}" for name in ("offload_optimizer", "offload_param") if name in z]
    extra = [f"host threads per rank={threads}"] if threads else []
    return "sparsetron: ZeRO offload settings (from model size and host RAM): " + ", ".join(parts + pins + extra)


def deepspeed_config(cfg, dp: int, device: torch.device, n_params: Optional[int] = None,
                     largest_param: int = 0) -> Dict[str, Any]:
    """`n_params`: this rank's parameter count (its tensor-parallel shard); with offload it sizes the
    buckets and buffers (offload_tuning); None keeps DeepSpeed's defaults."""
    from omegaconf import OmegaConf

    p, t, o = cfg.parallel, cfg.train, cfg.optim
    zero: Dict[str, Any] = {"stage": p.zero_stage}
    offloading = p.offload_optimizer != "none" or p.offload_param != "none"
    pin, buffer_size = bool(p.pin_memory) and torch.cuda.is_available(), None
    if offloading and n_params:
        gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        tuned = offload_tuning(cfg, n_params, dp, device, largest_param=largest_param, gpu_bytes=gpu)
        pin = tuned.pop("_pin_memory")
        buffer_size = tuned.pop("_param_buffer_size", None)
        zero.update(tuned)
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, p, params=False, pin=pin)
    if p.offload_param != "none":
        zero["offload_param"] = _offload(p.offload_param, p, params=True, pin=pin)
        if buffer_size:
            zero["offload_param"]["buffer_size"] = buffer_size
    ds: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolved_precision(t.precision, device) == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client optimizer may be torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ...also offloaded (optim.offload_impl=torch)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if "nvme" in (p.offload_optimizer, p.offload_param):
        ds["aio"] = dict(OmegaConf.to_container(p.aio, resolve=True)) if not isinstance(p.aio, dict) else dict(p.aio)
    overrides = p.deepspeed_overrides
    if not isinstance(overrides, dict):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    return deep_merge(ds, overrides or {})
