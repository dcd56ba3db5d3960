"""The DeepSpeed JSON, generated from the Hydra config (the user never writes it).

`parallel.deepspeed_overrides` is deep-merged last, so any key can be changed from the command
line, e.g. `+parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=5e7`; setting an
`optimizer` block there makes DeepSpeed build its own optimizer (DeepSpeedCPUAdam when the
optimizer is offloaded) instead of the torch AdamW every other engine uses."""

import copy
from typing import Any, Dict

import torch


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


def _offload(device: str, p, params: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"device": device, "pin_memory": bool(p.pin_memory) and torch.cuda.is_available()}
    if device == "nvme":
        out["nvme_path"] = p.nvme_path
        if params:
            out["buffer_count"] = 5
    return out


def deepspeed_config(cfg, dp: int, device: torch.device) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    p, t, o = cfg.parallel, cfg.train, cfg.optim
    zero: Dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, p, params=False)
    if p.offload_param != "none":
        zero["offload_param"] = _offload(p.offload_param, p, params=True)
    ds: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolved_precision(t.precision, device) == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ...also when the optimizer state is offloaded
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if "nvme" in (p.offload_optimizer, p.offload_param):
        ds["aio"] = dict(OmegaConf.to_container(p.aio, resolve=True)) if not isinstance(p.aio, dict) else dict(p.aio)
    overrides = p.deepspeed_overrides
    if not isinstance(overrides, dict):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    return deep_merge(ds, overrides or {})
