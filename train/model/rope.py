"""Rotary position embedding, "rotate half" convention (HF Llama), so exported weights need no
permutation. cos/sin have shape (S, head_dim // 2).

The tables follow `transformers`' RoPE variants exactly (modeling_rope_utils: default, linear,
dynamic, llama3, yarn): every variant only changes the inverse frequencies and (yarn) scales cos and
sin, so both the PyTorch rotation and the fused Triton kernel (kernels/rope, which reads these same
tables) honour the scaling with no change of their own. Frequencies are computed in float64."""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from sparsetron.configs.schema.model import head_dim_of


@dataclass(frozen=True)
class RopeScaling:
    """The scaling parameters of one RoPE variant (sparsetron's model.rope_* fields)."""

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: Optional[int] = None  # None: the model's max_seq_len
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # yarn; None: 0.1 * ln(factor) + 1
    truncate: bool = True

    @classmethod
    def from_model_config(cls, cfg) -> "RopeScaling":
        get = lambda name, default: getattr(cfg, f"rope_{name}", default)  # noqa: E731  (older configs lack them)
        return cls(type=get("type", "default"), factor=get("factor", 1.0), low_freq_factor=get("low_freq_factor", 1.0),
                   high_freq_factor=get("high_freq_factor", 4.0), original_max_seq_len=get("original_max_seq_len", None),
                   beta_fast=get("beta_fast", 32.0), beta_slow=get("beta_slow", 1.0),
                   attention_factor=get("attention_factor", None), truncate=get("truncate", True))


def yarn_attention_factor(factor: float, mscale: Optional[float] = None, mscale_all_dim: Optional[float] = None) -> float:
    """YaRN's cos/sin scale when the config gives none (HF `_compute_yarn_parameters`)."""

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _llama3(inv_freq: torch.Tensor, s: RopeScaling, context: int) -> torch.Tensor:
    low_wavelen, high_wavelen = context / s.low_freq_factor, context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)  # long waves: interpolate
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling, context: int) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(head_dim, theta)
    interpolation = extrapolation / s.factor
    keep = 1 - ramp  # 1: high frequency, kept as is; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def rope_inv_freq(head_dim: int, max_seq_len: int, theta: float,
                  scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, float]:
    """float64 inverse frequencies (head_dim // 2,) and the cos/sin scale of a RoPE variant."""
    s = scaling or RopeScaling()
    context = s.original_max_seq_len or max_seq_len
    if s.type == "default":
        return _base_inv_freq(head_dim, theta), 1.0
    if s.type == "linear":
        return _base_inv_freq(head_dim, theta) / s.factor, 1.0
    if s.type == "dynamic":
        # HF at any length <= its max_position_embeddings (`context`); longer models are refused by the schema
        base = theta * ((s.factor * context / context) - (s.factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inv_freq(head_dim, base), 1.0
    if s.type == "llama3":
        return _llama3(_base_inv_freq(head_dim, theta), s, context), 1.0
    if s.type == "yarn":
        scale = s.attention_factor if s.attention_factor is not None else yarn_attention_factor(s.factor)
        return _yarn(head_dim, theta, s, context), scale
    raise ValueError(f"model.rope_type: got {s.type!r}, allowed: default, linear, dynamic, llama3, yarn")


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_seq_len, head_dim // 2) in float32."""
    inv_freq, scale = rope_inv_freq(head_dim, max_seq_len, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def model_rope_tables(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of a model config (rope_theta, rope_* scaling, head_dim, max_seq_len)."""
    return rope_tables(head_dim_of(cfg), cfg.max_seq_len, cfg.rope_theta, RopeScaling.from_model_config(cfg))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); cos, sin: (S, D/2). Returns x rotated, in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
