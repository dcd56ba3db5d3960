"""moe.capacity_factor seen from above the model: the logged dropped fractions (train.metrics) and the
config errors through Hydra compose + validate. The routing semantics are tested beside the router
(train/model/moe/test_capacity.py)."""

import pytest
import torch

from sparsetron.configs.schema.moe import MoEConfig, check_moe_fields
from sparsetron.configs.schema.validate import ConfigError, validate
from sparsetron.train.cli import compose
from sparsetron.train.metrics import routing_metrics
from sparsetron.train.model.moe.layer import MoEMLP
from sparsetron.train.model.moe.router import Router


def test_routing_metrics_log_dropped_fractions():
    m = torch.nn.Module()
    m.mlp = MoEMLP(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, implementation="torch", capacity_factor=0.5))
    m.mlp.router.weight.data[0] *= 4
    m.mlp(torch.randn(2, 10, 16))
    out = routing_metrics(m)
    stats = m.mlp.last_stats
    assert stats["tokens_dropped"] > 0
    assert out["moe/mlp/dropped_assignment_fraction"] == pytest.approx(stats["tokens_dropped"].item() / 40)
    assert out["moe/mlp/dropped_token_fraction"] == float(stats["dropped_token_fraction"])
    assert out["moe/mlp/tokens_dropped"] == float(stats["tokens_dropped"])


@pytest.mark.parametrize(
    "overrides,fields",
    [(["moe.capacity_factor=-0.5"], ["moe.capacity_factor", ">= 0"]),
     (["moe.capacity_factor=1.25", "moe.token_rounding=true"], ["moe.capacity_factor", "moe.token_rounding"])],
)
def test_config_errors_name_the_fields(overrides, fields):
    cfg = compose(["experiment=moe_tiny"] + overrides, run_dir="/tmp/x")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert err.value.field == "moe.capacity_factor"
    assert all(f in str(err.value) for f in fields)
    with pytest.raises(ValueError, match="capacity_factor"):  # the layer refuses on its own too
        MoEMLP(16, cfg.moe)


def test_capacity_preset_and_nan_refused():
    cfg = compose(["experiment=moe_tiny", "moe=capacity"], run_dir="/tmp/x")
    validate(cfg, world_size=1)
    assert cfg.moe.capacity_factor == 1.25 and not cfg.moe.token_rounding
    with pytest.raises(ConfigError, match="moe.capacity_factor"):
        check_moe_fields(MoEConfig(capacity_factor=float("nan")), ConfigError)
    with pytest.raises(ValueError, match="moe.capacity_factor"):
        Router(8, 4, 2, capacity_factor=float("nan"))
