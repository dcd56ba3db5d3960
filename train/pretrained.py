"""Start a run from existing weights (train.init_from): a sparsetron checkpoint at any layout, or a
Hugging Face Llama folder. Unlike `resume`, only the weights come along: step, optimizer and data
position start fresh (fine-tuning)."""

import os

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt

def _check_fields(source: str, saved: dict, model_cfg) -> None:
    current = OmegaConf.to_container(model_cfg) if OmegaConf.is_config(model_cfg) else vars(model_cfg)
    for key in ckpt.MODEL_SHAPE_KEYS:
        if key in saved and saved[key] != current.get(key):
            raise ckpt.CheckpointError(
                f"train.init_from={source}: it has model.{key}={saved[key]!r}, this run has "
                f"model.{key}={current.get(key)!r}; set model.{key}={saved[key]!r}"
            )


def load_pretrained(model: torch.nn.Module, path: str) -> str:
    """Load weights into the (unsharded) model; returns what kind of source it was."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, ckpt.COMPLETE)):
        from .hf import read_hf

        fields, weights = read_hf(path)
        _check_fields(path, fields, model.cfg)
        kind = "hf"
    else:
        from sparsetron.parallel.reshard import consolidated_weights

        ckpt.check_complete(path)
        state = ckpt.read_json(path, "trainer_state.json")
        _check_fields(path, state.get("model", {}), model.cfg)
        weights = consolidated_weights(path)
        kind = "sparsetron"
    dtype = next(model.parameters()).dtype
    ckpt.load_model_weights(model, {k: v.to(dtype) for k, v in weights.items()}, path)
    return kind
