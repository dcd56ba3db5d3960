"""A pipeline rank frees the other stages before the model moves to its device, so a model too big for
one GPU (built on the host) never lands on it whole."""

import types

import pytest
import torch

from sparsetron.parallel.pipeline import free_other_stages, local_stage_parts, to_device_except_meta
from sparsetron.tests.parallel_harness import compose_layout
from sparsetron.train.model import Llama


def _parts(cfg, pp_rank, schedule="1f1b", virtual=1):
    pcfg = types.SimpleNamespace(pp_schedule=schedule, pp_virtual_stages=virtual, pp_layers=[])
    return local_stage_parts(Llama(cfg.model), types.SimpleNamespace(pp=2, pp_rank=pp_rank), pcfg)


@pytest.mark.parametrize("tied", [False, True])
def test_last_rank_keeps_only_its_layers_norm_and_head(tied):
    cfg = compose_layout([f"model.tie_embeddings={str(tied).lower()}"])
    model = Llama(cfg.model)
    parts = _parts(cfg, pp_rank=1)
    assert parts == {"layers": {2, 3}, "first": False, "last": True}
    free_other_stages(model, parts, keep_embedding=tied and parts["last"])
    assert [b.attn.q_proj.weight.is_meta for b in model.layers] == [True, True, False, False]
    assert model.embed.weight.is_meta == (not tied)  # a tied head still needs the embedding to copy
    assert not model.norm.weight.is_meta and not model.head.weight.is_meta
    moved = to_device_except_meta(model, torch.device("cpu"))  # meta stays meta, the rest moves
    assert moved.layers[3].attn.q_proj.weight.device.type == "cpu" and moved.layers[0].attn.q_proj.weight.is_meta
    assert moved.rope_cos.device.type == "cpu"


def test_interleaved_and_zbv_placement():
    cfg = compose_layout([])  # 4 layers
    assert _parts(cfg, 0, "interleaved_1f1b", 2) == {"layers": {0, 2}, "first": True, "last": False}  # stages 0, 2
    assert _parts(cfg, 0, "zbv") == {"layers": {0, 3}, "first": True, "last": True}  # the V: stages 0 and 3
