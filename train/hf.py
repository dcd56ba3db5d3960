"""Export/import of weights as a Hugging Face Llama folder (model.safetensors + config.json),
loadable by `transformers.LlamaForCausalLM.from_pretrained(folder)`; no pickles either way.

Exact or refused: import reads every function-defining config field (train/hf_config.py) and export
writes them all back (head_dim, norm eps, RoPE type and parameters), so the logits match transformers.

    python -m sparsetron.train.hf FOLDER [--compare]   # the model.* fields it imports as
"""

import json
import os
import re
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError

# ours -> HF, per layer (the RoPE convention is HF's already, so no weight permutation)
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_KEY.match(name)
    if not m or m.group(2) not in _LAYER:
        raise CheckpointError(f"parameter {name!r} has no Hugging Face Llama equivalent (MoE / sparse attention "
                              f"models cannot be exported as LlamaForCausalLM)")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def from_hf_name(name: str) -> str:
    inverse = {v: k for k, v in _GLOBAL.items()}
    if name in inverse:
        return inverse[name]
    m = _HF_LAYER_KEY.match(name)
    inv_layer = {v: k for k, v in _LAYER.items()}
    if not m or m.group(2) not in inv_layer:
        raise CheckpointError(f"HF weight {name!r} is not part of a Llama model sparsetron can load")
    return f"layers.{m.group(1)}.{inv_layer[m.group(2)]}"


def hf_rope_parameters(cfg) -> dict:
    """HF `rope_parameters` of a model config: every parameter its rope type reads, written out
    (yarn's attention factor resolved) so that no transformers default is relied on."""
    from .model.rope import yarn_attention_factor

    kind = cfg.rope_type
    rope = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    if kind == "default":
        return rope
    rope["factor"] = cfg.rope_factor
    if kind in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if kind == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if kind == "yarn":
        factor = cfg.rope_attention_factor
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                    attention_factor=float(factor if factor is not None else yarn_attention_factor(cfg.rope_factor)))
    return rope


def hf_config(cfg, dtype: torch.dtype) -> dict:
    from sparsetron.configs.schema.model import head_dim_of

    rope = hf_rope_parameters(cfg)
    # dynamic RoPE rescales past max_position_embeddings, so that length is part of the function
    max_positions = (cfg.rope_original_max_seq_len or cfg.max_seq_len) if cfg.rope_type == "dynamic" else cfg.max_seq_len
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim_of(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        # transformers < 5 reads only rope_scaling (5 gives it priority): the same parameters, theta on top
        "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
    }


def export_hf(model: torch.nn.Module, folder: str, dtype: torch.dtype = torch.float32) -> str:
    """Write `model` (a sparsetron Llama) as an HF Llama folder. Written under a temp name, then renamed."""
    cfg = model.cfg
    if cfg.mlp != "swiglu":
        raise CheckpointError(f"model.mlp={cfg.mlp!r} cannot be exported as LlamaForCausalLM (only swiglu)")
    tensors: Dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "head.weight" and cfg.tie_embeddings:
            continue
        tensors[to_hf_name(name)] = t.detach().to("cpu", dtype).contiguous()
    tmp = folder.rstrip("/") + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2)
    if os.path.isdir(folder):
        import shutil

        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def read_hf(folder: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Model config fields (sparsetron names) and weights (sparsetron names) of an HF Llama folder.
    Every config field that changes the function is read (train/hf_config.py); one this model cannot
    compute exactly is a CheckpointError naming it."""
    from .hf_config import model_fields

    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{cfg_path}: cannot read ({err})") from None
    fields = model_fields(hf, cfg_path)
    shards = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    weights: Dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            for name, t in load_file(os.path.join(folder, shard)).items():
                weights[from_hf_name(name)] = t
        except OSError as err:
            raise CheckpointError(f"{folder}/{shard}: cannot read ({err})") from None
    if fields["tie_embeddings"] and "head.weight" in weights:
        # transformers ties lm_head to embed_tokens and ignores a stored lm_head; a different one is ambiguous
        head, embed = weights.pop("head.weight"), weights.get("embed.weight")
        if embed is None or not torch.equal(head, embed):
            raise CheckpointError(f"{cfg_path}: tie_word_embeddings=true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight; set tie_word_embeddings=false to keep both")
    return fields, weights


def import_hf(folder: str, dtype: torch.dtype = torch.float32):
    """A sparsetron Llama built from and loaded with an HF Llama folder."""
    from sparsetron.configs.schema import ModelConfig

    from .checkpoint import load_model_weights
    from .model import Llama

    fields, weights = read_hf(folder)
    model = Llama(ModelConfig(**fields))
    load_model_weights(model, {k: v.to(dtype) for k, v in weights.items()}, folder)
    return model.to(dtype)


def compare_with_transformers(folder: str, seq_len: int = 64, seed: int = 0) -> float:
    """max |logit difference| between the import and `transformers.LlamaForCausalLM` (fp32, random tokens)."""
    import transformers

    ours = import_hf(folder).eval()
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, **{dtype_arg: torch.float32}).eval()
    seq_len = min(seq_len, ours.cfg.max_seq_len)
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


def main(argv=None) -> int:
    """python -m sparsetron.train.hf FOLDER [--compare]: the model.* fields an HF Llama folder imports
    as (or the one-line reason it cannot), optionally checked against transformers' logits."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("folder", help="a Hugging Face Llama folder (config.json + *.safetensors)")
    ap.add_argument("--compare", action="store_true", help="also run transformers on random tokens (fp32)")
    args = ap.parse_args(argv)
    try:
        fields, _ = read_hf(args.folder)
        print(" ".join(f"model.{k}={'null' if v is None else v}" for k, v in fields.items()))
        if args.compare:
            print(f"max |logit difference| vs transformers: {compare_with_transformers(args.folder):.3g}")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
