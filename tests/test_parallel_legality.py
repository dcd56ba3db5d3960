"""Layout arithmetic without processes: rank layout vs megatron-core, the legality matrix, the
DeepSpeed JSON, pipeline stage placement, and tensor-parallel shard join/split."""

import pytest
import torch

from sparsetron.configs.schema.validate import ConfigError, validate
from sparsetron.parallel.deepspeed_config import deepspeed_config
from sparsetron.parallel.groups import layout_ranks
from sparsetron.parallel.legality import resolve_engine
from sparsetron.parallel.pipeline import stage_layers, stages_of_rank
from sparsetron.parallel.reshard import split_dim, tp_join, tp_slice
from sparsetron.train.cli import compose

TINY = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.vocab_size=512", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2"]


@pytest.mark.parametrize("tp,cp,dp,pp", [(2, 1, 2, 2), (1, 1, 4, 1), (2, 2, 1, 2), (4, 1, 1, 2), (1, 2, 2, 2)])
def test_rank_layout_matches_megatron_core(tp, cp, dp, pp):
    from megatron.core.parallel_state import RankGenerator

    ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    ours = layout_ranks(tp, cp, dp, pp)
    for kind in ("tp", "cp", "dp", "pp"):
        assert sorted(ours[kind]) == sorted(ref.get_ranks(kind)), kind


@pytest.mark.parametrize("tp,dp,ep,pp", [(1, 4, 2, 1), (2, 4, 2, 1), (1, 8, 4, 2)])
def test_expert_layout_matches_megatron_core(tp, dp, ep, pp):
    """EP carved out of DP: megatron's expert rank generator (expert-tp = tp)."""
    from megatron.core.parallel_state import RankGenerator

    ref = RankGenerator(tp=tp, ep=ep, dp=dp // ep, pp=pp, cp=1, order="tp-ep-dp-pp")
    ours = layout_ranks(tp, 1, dp, pp, ep)
    assert sorted(ours["ep"]) == sorted(ref.get_ranks("ep"))
    assert sorted(ours["expert_dp"]) == sorted(ref.get_ranks("dp"))


def test_embedding_group_joins_first_and_last_stage():
    assert sorted(layout_ranks(2, 1, 1, 3)["embed"]) == [[0, 4], [1, 5]]


ILLEGAL = [  # (overrides, world size, field, words the message must contain)
    (["parallel.tp=2"], 4 * 2 + 1, "parallel", "must equal the world size"),
    (["parallel.tp=3"], 3, "parallel.tp", "n_heads=4 is not divisible by tp=3"),
    (["parallel.tp=4"], 4, "parallel.tp", "n_kv_heads=2 is not divisible by tp=4"),
    (["parallel.tp=2", "model.mlp=moe"], 2, "parallel.tp", "for MoE use parallel.ep"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel", "needs parallel.tp > 1"),
    (["parallel.pp=3"], 3, "parallel.pp", "n_layers=4 is not divisible by pp*virtual stages = 3*1"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4"], 2,
     "parallel.pp", "not divisible by pp*virtual stages = 2*4"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2, "parallel.pp_virtual_stages", ">= 2"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv"], 2, "parallel.pp_virtual_stages", "== 2"),
    (["parallel.pp=2", "parallel.pp_layers=[1,2]"], 2, "parallel.pp_layers", "summing to model.n_layers=4"),
    (["parallel.pp=2", "train.micro_batch_size=8"], 2, "train.global_batch_size", "micro-batches per step >= pp"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage", "use zero_stage=1 with pp"),
    (["parallel.pp=2", "parallel.zero_stage=3"], 4, "parallel.zero_stage", "ZeRO-3 with pipeline parallel"),
    (["parallel.pp=2", "parallel.engine=deepspeed"], 2, "parallel.engine", "use engine=native"),
    (["parallel.engine=native", "parallel.zero_stage=2"], 2, "parallel.engine", "use engine=deepspeed"),
    (["parallel.offload_param=cpu", "parallel.zero_stage=2"], 2, "parallel.offload_param", "use zero_stage=3"),
    (["parallel.offload_optimizer=cpu"], 2, "parallel.offload_optimizer", "needs zero_stage >= 1"),
    (["parallel.offload_optimizer=cpu", "parallel.zero_stage=1", "parallel.engine=native"], 2, "parallel.engine",
     "engine=deepspeed"),
    (["parallel.cp=2", "parallel.pp=2"], 4, "parallel.cp", "use cp=1"),
    (["parallel.ep=2"], 2, "parallel.ep", "needs model.mlp=moe"),
    (["parallel.ep=4", "model.mlp=moe"], 2, "parallel.ep", "dp=2 must be divisible"),
    (["parallel.pp_schedule=bogus"], 1, "parallel.pp_schedule", "allowed: gpipe, 1f1b"),
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage", "allowed: 0, 1, 2, 3"),
    # N:M fine-tuning: every engine, but whole N:M groups per TP shard and what is not built is refused
    (["sparsity=nm48", "parallel.tp=2", "model.ffn_dim=136"], 2, "sparsity.m", "shards of 68, which must be whole"),
    (["sparsity=nm24", "parallel.ep=2", "model.mlp=moe"], 2, "parallel.ep", "N:M fine-tuning with expert parallel"),
    (["sparsity=nm24", "parallel.tp=2", "parallel.zero_stage=1"], 2, "parallel.tp", "use engine=native"),
    (["sparsity=nm24", "sparsity.mode=fixed", "parallel.zero_stage=3"], 2, "sparsity.mode", "use mode=srste"),
    (["sparsity=nm24", "parallel.zero_stage=3", "parallel.offload_param=cpu"], 2, "parallel.offload_param",
     "offload_param=none"),
]


@pytest.mark.parametrize("overrides,world,field,words", ILLEGAL)
def test_illegal_layouts_raise_the_documented_error(overrides, world, field, words):
    cfg = compose([*TINY, *overrides], run_dir="/tmp/x")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert err.value.field == field, str(err.value)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides,world,engine", [
    ([], 4, "native"),
    (["parallel.tp=2", "parallel.pp=2"], 4, "native"),
    (["parallel.pp=2", "parallel.zero_stage=1"], 4, "native"),
    (["parallel.zero_stage=1"], 2, "deepspeed"),
    (["parallel.tp=2", "parallel.zero_stage=3", "parallel.offload_optimizer=nvme", "parallel.offload_param=nvme"],
     4, "deepspeed"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"], 2, "native"),
    (["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.micro_batch_size=8"], 2, "native"),
    (["parallel.ep=2", "model.mlp=moe"], 2, "native"),
    (["sparsity=nm24", "parallel.tp=2", "parallel.sequence_parallel=true"], 4, "native"),
    (["sparsity=nm24", "parallel.pp=2", "parallel.zero_stage=1"], 4, "native"),
    (["sparsity=nm24", "sparsity.mode=fixed", "parallel.tp=2", "parallel.pp=2"], 4, "native"),
    (["sparsity=nm48", "parallel.tp=2", "model.ffn_dim=136", "sparsity.layers=[*.q_proj]"], 2, "native"),
    (["sparsity=nm24", "parallel.zero_stage=3", "parallel.offload_optimizer=cpu"], 2, "deepspeed"),
])
def test_legal_layouts_pass_and_pick_an_engine(overrides, world, engine):
    cfg = compose([*TINY, *overrides], run_dir="/tmp/x")
    validate(cfg, world_size=world)
    assert resolve_engine(cfg.parallel) == engine


def test_deepspeed_json_is_generated_and_overridable():
    cfg = compose([*TINY, "parallel.zero_stage=3", "parallel.offload_optimizer=nvme", "parallel.offload_param=cpu",
                   "parallel.nvme_path=/mnt/nvme", "parallel.aio.queue_depth=16",
                   "+parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=1000",
                   "+parallel.deepspeed_overrides.gradient_clipping=0.5"], run_dir="/tmp/x")
    ds = deepspeed_config(cfg, dp=2, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 1000
    assert z["offload_optimizer"]["device"] == "nvme" and z["offload_optimizer"]["nvme_path"] == "/mnt/nvme"
    assert z["offload_param"]["device"] == "cpu"
    assert ds["aio"]["queue_depth"] == 16
    assert ds["gradient_clipping"] == 0.5  # the override wins over optim.grad_clip
    assert ds["bf16"]["enabled"] is False  # CPU: fp32


def test_stage_split_and_placement():
    assert stage_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(8, 2, [3, 5]) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert stages_of_rank(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert stages_of_rank(0, 2, 2, "zbv") == [0, 3] and stages_of_rank(1, 2, 2, "zbv") == [1, 2]


def test_tp_split_and_join_round_trip_every_weight():
    from sparsetron.train.model import Llama

    cfg = compose(TINY, run_dir="/tmp/x")
    state = Llama(cfg.model).state_dict()
    dims = {name: split_dim(name) for name in state}
    assert dims["layers.0.attn.q_proj.weight"] == 0 and dims["layers.0.attn.o_proj.weight"] == 1
    assert dims["layers.0.mlp.down_proj.weight"] == 1 and dims["embed.weight"] == 0
    assert dims["layers.0.attn_norm.weight"] is None
    for tp in (2, 4):
        for name, full in state.items():
            shards = [tp_slice(name, full, tp, r) for r in range(tp)]
            if dims[name] is not None:
                assert shards[0].shape[dims[name]] == full.shape[dims[name]] // tp
            assert torch.equal(tp_join(name, shards), full)


@pytest.mark.parametrize("preset,world,engine", [("single", 2, "native"), ("zero3_offload", 2, "deepspeed"),
                                                 ("tp_pp", 8, "native")])
def test_parallel_presets_are_legal(preset, world, engine):
    cfg = compose([*TINY, f"parallel={preset}", "train.global_batch_size=16"], run_dir="/tmp/x")
    validate(cfg, world_size=world)
    assert resolve_engine(cfg.parallel) == engine
