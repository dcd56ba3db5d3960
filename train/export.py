"""Export a sparsetron checkpoint as a Hugging Face Llama folder, or check one loads back.

    python -m sparsetron.train.export CHECKPOINT_DIR OUT_DIR [--dtype bf16]
"""

import argparse
import os
import sys

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt


def load_model_from_checkpoint(path: str):
    """The full (unsharded) model of a checkpoint saved at any parallel layout."""
    from sparsetron.configs.schema import Config

    from .model import Llama

    ckpt.check_complete(path)
    cfg_path = os.path.join(path, "config.yaml")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(cfg_path))
    except Exception as err:
        raise ckpt.CheckpointError(f"{cfg_path}: cannot read the run's config ({err})") from None
    from sparsetron.parallel.reshard import consolidated_weights

    model = Llama(cfg.model, cfg.attention, cfg.moe)
    ckpt.load_model_weights(model, consolidated_weights(path), path)  # any TP/PP/EP layout
    if os.path.exists(os.path.join(path, "sparsity.pt")):  # N:M run: dense weights + masks -> sparse weights
        from .sparsity.recipe import apply_saved_masks

        apply_saved_masks(model, cfg.sparsity, ckpt.read_torch(path, "sparsity.pt"))
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (runs/<name>/checkpoints/step_XXXXXXXX)")
    ap.add_argument("out", help="output folder (model.safetensors + config.json)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    args = ap.parse_args(argv)
    from .hf import export_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model = load_model_from_checkpoint(os.path.expanduser(args.checkpoint))
        export_hf(model, os.path.expanduser(args.out), dtype)
    except ckpt.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), "tokenizer.json")
    if os.path.exists(tokenizer):
        import shutil

        shutil.copy(tokenizer, os.path.join(args.out, "tokenizer.json"))
    print(f"exported {model.num_params() / 1e6:.1f}M parameters to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
