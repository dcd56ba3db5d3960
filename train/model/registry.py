"""Pluggable attention and MLP modules, chosen by name from the config.

A later subsystem (sparse attention, MoE) registers its module here; the Llama block only
looks names up, so model code never imports a kernel it does not use.

Attention factories are called as ``factory(model_cfg, attention_cfg, layer_idx)`` and MLP
factories as ``factory(model_cfg, moe_cfg, layer_idx)``; both return an ``nn.Module``.
"""

from typing import Callable, Dict

ATTENTION: Dict[str, Callable] = {}
MLP: Dict[str, Callable] = {}

# Modules that register on import; imported lazily so the dense path never pulls in Triton.
_PLUGINS = {
    ("attention", "nsa"): "sparsetron.train.model.sparse_attention.modules",
    ("attention", "moba"): "sparsetron.train.model.sparse_attention.modules",
    ("attention", "sliding_window"): "sparsetron.train.model.sparse_attention.modules",
    ("mlp", "moe"): "sparsetron.train.model.moe.layer",
}


def register_attention(name: str):
    def deco(factory):
        ATTENTION[name] = factory
        return factory

    return deco


def register_mlp(name: str):
    def deco(factory):
        MLP[name] = factory
        return factory

    return deco


def _lookup(kind: str, table: Dict[str, Callable], name: str) -> Callable:
    if name not in table and (kind, name) in _PLUGINS:
        import importlib

        importlib.import_module(_PLUGINS[(kind, name)])
    if name not in table:
        known = sorted(set(table) | {n for k, n in _PLUGINS if k == kind})
        raise ValueError(f"unknown {kind} '{name}'; registered: {known}")
    return table[name]


def get_attention(name: str) -> Callable:
    return _lookup("attention", ATTENTION, name)


def get_mlp(name: str) -> Callable:
    return _lookup("mlp", MLP, name)
