"""A Hugging Face Llama `config.json` -> sparsetron `model.*` fields, exactly or not at all.

Every field that changes what `transformers.LlamaForCausalLM` computes is read here, with the
defaults `transformers.LlamaConfig` gives a field the file omits. A field whose value sparsetron
cannot compute exactly raises a one-line CheckpointError naming the field and what to do instead;
nothing is dropped silently. Supported RoPE types: default, linear, dynamic (up to
max_position_embeddings, beyond which HF recomputes the frequencies per length), llama3, yarn.
"""

from typing import Any, Dict

from .checkpoint import CheckpointError

# transformers.LlamaConfig's defaults, for fields a config.json leaves out
HF_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "attention_dropout": 0.0,
}
SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "yarn")


def _get(hf: dict, key: str):
    value = hf.get(key)
    return HF_DEFAULTS.get(key) if value is None else value


def _refuse_unsupported(hf: dict, where: str) -> None:
    act = _get(hf, "hidden_act")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported: sparsetron's MLP is SwiGLU "
                              f"(hidden_act='silu' only)")
    for key in ("attention_bias", "mlp_bias"):
        if _get(hf, key):
            part = "attention q/k/v/o" if key == "attention_bias" else "MLP gate/up/down"
            raise CheckpointError(f"{where}: {key}=true is not supported: sparsetron's {part} projections have "
                                  f"no bias (only {key}=false imports exactly)")
    dropout = _get(hf, "attention_dropout")
    if dropout:
        raise CheckpointError(f"{where}: attention_dropout={dropout} is not supported: sparsetron has no attention "
                              f"dropout (set it to 0.0 in config.json)")
    if hf.get("quantization_config"):
        raise CheckpointError(f"{where}: quantization_config is not supported: sparsetron loads unquantized weights "
                              f"(dequantize the checkpoint first)")
    _refuse_partial_rotary(hf.get("partial_rotary_factor"), where, "partial_rotary_factor")


def _refuse_partial_rotary(value, where: str, field: str) -> None:
    if value is not None and value != 1.0:
        raise CheckpointError(f"{where}: {field}={value} is not supported: sparsetron rotates the whole head (only 1.0)")


def _rope_fields(hf: dict, where: str, max_positions: int) -> Dict[str, Any]:
    """model.rope_* fields, following transformers' RotaryEmbeddingConfigMixin: `rope_scaling` (the
    older name) wins over `rope_parameters`; `rope_theta` inside the dict wins over the top-level one."""
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(source) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{where}: {source} is nested per layer type: sparsetron uses one RoPE for every "
                              f"layer (give a flat {source})")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise CheckpointError(f"{where}: {source}.rope_type={kind!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ROPE)})")
    _refuse_partial_rotary(rope.get("partial_rotary_factor"), where, f"{source}.partial_rotary_factor")
    theta = rope.get("rope_theta")
    fields: Dict[str, Any] = {"rope_type": kind, "rope_theta": float(_get(hf, "rope_theta") if theta is None else theta)}
    if kind == "default":
        return fields

    def need(key: str):
        if rope.get(key) is None:
            raise CheckpointError(f"{where}: {source}.{key} is missing; rope_type={kind!r} needs it")
        return rope[key]

    if kind in ("llama3", "yarn"):
        # as transformers: a top-level original_max_position_embeddings wins, then the dict's, then max_positions
        original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        fields["rope_original_max_seq_len"] = int(original or max_positions)
    if kind == "dynamic":
        fields["rope_original_max_seq_len"] = max_positions  # HF rescales past this length
    if kind == "yarn":
        from .model.rope import yarn_attention_factor

        factor = rope.get("factor")
        factor = float(max_positions / fields["rope_original_max_seq_len"] if factor is None else factor)
        attention = rope.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, rope.get("mscale"), rope.get("mscale_all_dim"))
        fields.update(rope_factor=factor, rope_attention_factor=float(attention),
                      rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                      rope_truncate=bool(rope.get("truncate", True)))
        return fields
    fields["rope_factor"] = float(need("factor"))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(need("low_freq_factor")),
                      rope_high_freq_factor=float(need("high_freq_factor")))
    return fields


def model_fields(hf: dict, where: str) -> Dict[str, Any]:
    """sparsetron ModelConfig fields of an HF Llama config dict (`where` names it in errors)."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type={hf.get('model_type')!r} is not supported (only 'llama')")
    _refuse_unsupported(hf, where)
    dim, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim")
    if head_dim is not None and dim % heads == 0 and head_dim == dim // heads:
        head_dim = None  # the usual width: keep model.head_dim unset, as in a sparsetron config
    max_positions = int(_get(hf, "max_position_embeddings"))
    fields = {
        "vocab_size": int(_get(hf, "vocab_size")), "dim": dim, "n_layers": int(_get(hf, "num_hidden_layers")),
        "n_heads": heads, "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn_dim": int(_get(hf, "intermediate_size")), "head_dim": None if head_dim is None else int(head_dim),
        "max_seq_len": max_positions, "norm_eps": float(_get(hf, "rms_norm_eps")),
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings")), "mlp": "swiglu",
        **_rope_fields(hf, where, max_positions),
    }
    from sparsetron.configs.schema.model import ModelConfig, check_model_fields

    def error(field: str, message: str) -> CheckpointError:
        return CheckpointError(f"{where}: it gives {field}: {message}")

    check_model_fields(ModelConfig(**fields), error)
    return fields
