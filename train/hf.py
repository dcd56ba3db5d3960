"""Export/import of weights as a Hugging Face Llama folder (model.safetensors + config.json),
loadable by `transformers.LlamaForCausalLM.from_pretrained(folder)`; no pickles either way."""

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


def hf_config(cfg, dtype: torch.dtype) -> dict:
    head_dim = cfg.dim // cfg.n_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
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
    """Model config fields (sparsetron names) and weights (sparsetron names) of an HF Llama folder."""
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{cfg_path}: cannot read ({err})") from None
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{cfg_path}: model_type={hf.get('model_type')!r}, expected 'llama'")
    rope = hf.get("rope_parameters") or {}
    fields = {
        "vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "ffn_dim": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-5), "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
    }
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
