"""Model shape (Llama-style decoder). Presets live in configs/model/*.yaml."""

from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

# The rotary-embedding variants the model computes exactly as `transformers` does (HF's
# `rope_parameters.rope_type`). OmegaConf 2.3 rejects Literal-typed fields, so the field below is a
# `str` checked against this list by `check_model_fields` (configs/schema/validate.py calls it).
RopeType = Literal["default", "linear", "dynamic", "llama3", "yarn"]
ROPE_TYPES = get_args(RopeType)


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 4096  # must match the tokenizer; the trainer checks it before step 0
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 704  # SwiGLU hidden size
    max_seq_len: int = 1024
    head_dim: Optional[int] = None  # per-head width; None: dim // n_heads (set when heads are wider/narrower)
    rope_theta: float = 10000.0
    # RoPE scaling (HF rope_parameters); each parameter is read only by the types named beside it
    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn
    rope_factor: float = 1.0  # linear, dynamic, llama3, yarn
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: Optional[int] = None  # llama3, yarn: pretraining context; dynamic: the
    #   length beyond which HF rescales (the model then refuses longer max_seq_len). None: max_seq_len
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: Optional[float] = None  # yarn: cos/sin scale; None: 0.1 * ln(factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    mlp: str = "swiglu"  # registered MLP: "swiglu" (dense) or "moe" (configs/moe)
    # Triton kernels: true = RMSNorm(+residual)/RoPE/SwiGLU/linear-CE; "loss" = only the chunked linear-CE
    # (the blocks left to torch.compile); false = none; auto = the trainer picks for the device
    # (train/auto_defaults.py; a model built outside the trainer reads an unresolved auto as false).
    # Typed Any: OmegaConf 2.3 has no Union/Literal fields; validate.py checks the value.
    fused_kernels: Any = "auto"
    activation_checkpointing: str = "none"  # none | attention | selective | full (train/model/checkpointing.py)


FUSED_KERNELS = (True, False, "auto", "loss")


def fused_blocks(m) -> bool:
    """Whether the blocks use the Triton RMSNorm/RoPE/SwiGLU (model.fused_kernels=true only)."""
    return m.fused_kernels is True


def fused_loss(m) -> bool:
    """Whether the loss is the chunked Triton linear-CE (model.fused_kernels=true or "loss")."""
    return m.fused_kernels is True or m.fused_kernels == "loss"


def head_dim_of(m) -> int:
    """The per-head width of a model config (dataclass or DictConfig)."""
    return getattr(m, "head_dim", None) or m.dim // m.n_heads


def check_model_fields(m, error) -> None:
    """Head-width and RoPE checks; `error(field, message)` builds the exception (ConfigError)."""
    if m.head_dim is None and m.dim % m.n_heads:
        raise error("model.n_heads", f"model.dim={m.dim} is not divisible by n_heads={m.n_heads} (or set model.head_dim)")
    if m.head_dim is not None and m.head_dim <= 0:
        raise error("model.head_dim", f"got {m.head_dim}, must be > 0 (or null for dim // n_heads)")
    if head_dim_of(m) % 2:
        field = "model.n_heads" if m.head_dim is None else "model.head_dim"
        raise error(field, f"head_dim={head_dim_of(m)} must be even for RoPE")
    if m.rope_type not in ROPE_TYPES:
        raise error("model.rope_type", f"got {m.rope_type!r}, allowed: {', '.join(ROPE_TYPES)}")
    if m.rope_type != "default" and m.rope_factor < 1.0:
        raise error("model.rope_factor", f"got {m.rope_factor}, must be >= 1 for rope_type={m.rope_type}")
    if m.rope_original_max_seq_len is not None and m.rope_original_max_seq_len <= 0:
        raise error("model.rope_original_max_seq_len", f"got {m.rope_original_max_seq_len}, must be > 0 or null")
    if m.rope_type == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise error("model.rope_low_freq_factor", f"llama3 needs 0 < rope_low_freq_factor < rope_high_freq_factor, "
                    f"got {m.rope_low_freq_factor} and {m.rope_high_freq_factor}")
    if m.rope_type == "dynamic" and m.max_seq_len > (m.rope_original_max_seq_len or m.max_seq_len):
        # past that length HF recomputes the frequencies for every sequence length; the fixed tables cannot
        raise error("model.max_seq_len", f"rope_type=dynamic: max_seq_len={m.max_seq_len} must be <= "
                    f"rope_original_max_seq_len={m.rope_original_max_seq_len}")
    if m.rope_type == "yarn" and m.rope_attention_factor is not None and m.rope_attention_factor <= 0:
        raise error("model.rope_attention_factor", f"got {m.rope_attention_factor}, must be > 0 or null")
