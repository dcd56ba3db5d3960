from .llama import Block, Llama
from .registry import get_attention, get_mlp, register_attention, register_mlp

__all__ = ["Block", "Llama", "get_attention", "get_mlp", "register_attention", "register_mlp"]
