"""Registers the sparse attention kinds with the model's attention registry. The registry
imports this module lazily when a config names one of them."""

from sparsetron.train.model.registry import register_attention
from .moba import MoBAAttention, SlidingWindowAttention
from .nsa import NSAAttention


@register_attention("nsa")
def _nsa(model_cfg, attn_cfg, layer_idx):
    return NSAAttention(model_cfg, attn_cfg, layer_idx)


@register_attention("moba")
def _moba(model_cfg, attn_cfg, layer_idx):
    return MoBAAttention(model_cfg, attn_cfg, layer_idx)


@register_attention("sliding_window")
def _sliding_window(model_cfg, attn_cfg, layer_idx):
    return SlidingWindowAttention(model_cfg, attn_cfg, layer_idx)
