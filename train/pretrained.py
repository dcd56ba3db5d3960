"""Start a run from existing weights (train.init_from): a sparsetron checkpoint at any layout, or a
Hugging Face Llama folder. Unlike `resume`, only the weights come along: step, optimizer and data
position start fresh (fine-tuning).

For a Hugging Face folder the checkpoint defines the function: `adopt_hf_model_config` copies its
fields (shapes, head_dim, norm_eps, rope_theta, RoPE scaling, tied embeddings, max_seq_len) into the
run's `model` config before the model is built. A value the run sets explicitly that differs is
refused with both values named. "Explicitly set" means: different from the schema default
(configs/schema/model.py: a preset, an experiment file or the command line chose it), or named in a
`model.*=` command-line override (when running under Hydra) even if equal to the default. The one
exception is model.max_seq_len, which only sizes the RoPE tables: any value is kept, except above the
checkpoint's max_position_embeddings for rope_type=dynamic (transformers rescales past it).
"""

import json
import os
from typing import Dict, List, Set

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt

# model fields an HF Llama folder defines (besides max_seq_len, see the module doc)
HF_FUNCTION_KEYS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp", "head_dim", "norm_eps",
    "tie_embeddings", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_truncate",
)


def is_hf_folder(path: str) -> bool:
    path = os.path.abspath(os.path.expanduser(path))
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, ckpt.COMPLETE))


def _as_dict(model_cfg) -> dict:
    return OmegaConf.to_container(model_cfg) if OmegaConf.is_config(model_cfg) else dict(vars(model_cfg))


def hf_model_fields(folder: str) -> dict:
    """The sparsetron model.* fields an HF folder defines, all of HF_FUNCTION_KEYS and max_seq_len
    (fields the checkpoint leaves at the schema default included, so adoption resets them too)."""
    from sparsetron.configs.schema import ModelConfig

    from .hf_config import model_fields

    cfg_path = os.path.join(os.path.abspath(os.path.expanduser(folder)), "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ckpt.CheckpointError(f"{cfg_path}: cannot read ({err})") from None
    full = vars(ModelConfig(**model_fields(hf, cfg_path)))
    return {k: full[k] for k in (*HF_FUNCTION_KEYS, "max_seq_len")}


def _command_line_model_keys() -> Set[str]:
    """model.* keys named by a Hydra command-line override; empty outside a Hydra app (compose())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except Exception:  # not running under @hydra.main
        return set()
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key[len("model."):])
    return keys


def _explicit_keys(current: dict) -> Set[str]:
    """The model.* fields this run sets explicitly (see the module doc)."""
    from sparsetron.configs.schema import ModelConfig

    defaults = vars(ModelConfig())
    return {k for k in defaults if current.get(k, defaults[k]) != defaults[k]} | _command_line_model_keys()


def _conflicts(hf: dict, current: dict, explicit: Set[str]) -> List[str]:
    out = [f"model.{key}: checkpoint {hf[key]!r}, run {current[key]!r}"
           for key in HF_FUNCTION_KEYS if key in explicit and current[key] != hf[key]]
    if "max_seq_len" in explicit and hf["rope_type"] == "dynamic" and current["max_seq_len"] > hf["max_seq_len"]:
        out.append(f"model.max_seq_len: checkpoint {hf['max_seq_len']!r} (dynamic RoPE rescales past it), "
                   f"run {current['max_seq_len']!r}")
    return out


def adopt_hf_model_config(cfg, announce: bool = True) -> Dict[str, tuple]:
    """With train.init_from on an HF folder: set cfg.model's function-defining fields from the
    checkpoint (in place; rank 0 prints them when `announce`). Returns {field: (old, new)} for the
    fields that changed; raises a CheckpointError listing every explicitly set field that conflicts.
    A no-op for other sources."""
    source = cfg.train.init_from
    if not source or not os.path.isdir(os.path.expanduser(source)) or not is_hf_folder(source):
        return {}
    hf = hf_model_fields(source)
    current = _as_dict(cfg.model)
    explicit = _explicit_keys(current)
    conflicts = _conflicts(hf, current, explicit)
    if conflicts:
        raise ckpt.CheckpointError(
            f"train.init_from={source} defines the model; this run sets conflicting values: {'; '.join(conflicts)} "
            f"(drop those overrides to use the checkpoint's)")
    adopt = [*HF_FUNCTION_KEYS] + ([] if "max_seq_len" in explicit else ["max_seq_len"])  # a set length is kept
    changed = {key: (current[key], hf[key]) for key in adopt if current[key] != hf[key]}
    for key, (_, value) in changed.items():
        cfg.model[key] = value
    if changed and announce and os.environ.get("RANK", "0") == "0":
        print(f"sparsetron: model config from {source}: "
              + ", ".join(f"model.{k}={new!r}" for k, (_, new) in changed.items()), flush=True)
    return changed


def _check_fields(source: str, saved: dict, model_cfg, keys) -> None:
    current = _as_dict(model_cfg)
    for key in keys:
        if key in saved and saved[key] != current.get(key):
            raise ckpt.CheckpointError(
                f"train.init_from={source}: it has model.{key}={saved[key]!r}, this run has "
                f"model.{key}={current.get(key)!r}; set model.{key}={saved[key]!r}"
            )


def load_pretrained(model: torch.nn.Module, path: str) -> str:
    """Load weights into the (unsharded) model; returns what kind of source it was."""
    path = os.path.abspath(os.path.expanduser(path))
    if is_hf_folder(path):
        from .hf import read_hf

        _, weights = read_hf(path)
        # the trainer adopted these already (adopt_hf_model_config); this guards other callers
        full = hf_model_fields(path)
        _check_fields(path, full, model.cfg, HF_FUNCTION_KEYS)
        if full["rope_type"] == "dynamic" and model.cfg.max_seq_len > full["max_seq_len"]:
            raise ckpt.CheckpointError(f"train.init_from={path}: dynamic RoPE rescales past max_position_embeddings="
                                       f"{full['max_seq_len']}; set model.max_seq_len<={full['max_seq_len']}")
        kind = "hf"
    else:
        from sparsetron.parallel.reshard import consolidated_weights

        ckpt.verify(path)  # damaged weights are refused, not fine-tuned from
        state = ckpt.read_json(path, "trainer_state.json")
        _check_fields(path, state.get("model", {}), model.cfg, ckpt.MODEL_SHAPE_KEYS)
        weights = consolidated_weights(path)
        kind = "sparsetron"
    dtype = next(model.parameters()).dtype
    ckpt.load_model_weights(model, {k: v.to(dtype) for k, v in weights.items()}, path)
    return kind
