"""Model shape (Llama-style decoder). Presets live in configs/model/*.yaml."""

from dataclasses import dataclass


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
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    mlp: str = "swiglu"  # registered MLP: "swiglu" (dense) or "moe" (configs/moe)
    fused_kernels: bool = False  # Triton RMSNorm/RoPE/SwiGLU/linear-CE where the device allows
    activation_checkpointing: str = "none"  # none | attention | selective | full (train/model/checkpointing.py)
