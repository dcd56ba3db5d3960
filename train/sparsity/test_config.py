import pytest

from sparsetron.train.sparsity import DistillConfig, SparsityConfig


def test_defaults_validate():
    SparsityConfig().validate()
    DistillConfig().validate()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("n", 4, "sparsity.n"),
        ("m", 1, "sparsity.m"),
        ("method", "sparsegpt", "sparsity.method"),
        ("mode", "soft", "sparsity.mode"),
        ("schedule", "cubic", "sparsity.schedule"),
        ("backend", "cutlass", "sparsity.backend"),
        ("srste_decay", -1.0, "sparsity.srste_decay"),
        ("mask_update_every", 0, "sparsity.mask_update_every"),
        ("layers", [], "sparsity.layers"),
    ],
)
def test_bad_sparsity_fields(field, value, match):
    cfg = SparsityConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_bad_ramp_and_distill():
    with pytest.raises(ValueError, match="ramp_start_step"):
        SparsityConfig(schedule="gradual", ramp_start_step=10, ramp_end_step=10).validate()
    with pytest.raises(ValueError, match="distill.temperature"):
        SparsityConfig(distill=DistillConfig(temperature=0.0)).validate()
    with pytest.raises(ValueError, match="distill.alpha_kl"):
        DistillConfig(alpha_kl=-1).validate()
