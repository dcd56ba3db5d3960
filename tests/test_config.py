import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from sparsetron.configs.schema.validate import ConfigError, validate
from sparsetron.train.cli import compose


def test_default_composes_and_validates():
    cfg = compose(run_dir="/tmp/x")
    validate(cfg, world_size=1)
    assert cfg.model.name == "tiny" and cfg.data.source == "stdlib" and cfg.attention.kind == "dense"


@pytest.mark.parametrize("preset,dim", [("tiny", 256), ("125m", 768), ("1b", 2048), ("8b", 4096)])
def test_model_presets(preset, dim):
    cfg = compose([f"model={preset}"], run_dir="/tmp/x")
    validate(cfg, world_size=1)
    assert cfg.model.dim == dim


def test_experiment_overrides_groups():
    cfg = compose(["experiment=gpu_125m"], run_dir="/tmp/x")
    assert cfg.model.name == "125m" and cfg.train.seq_len == 1024 and cfg.name == "gpu_125m"


@pytest.mark.parametrize(
    "override,needle",
    [("model.dimm=3", "model.dimm"), ("model.dim=abc", "model.dim"), ("train.nonsense=1", "train.nonsense")],
)
def test_typo_or_wrong_type_names_the_field(override, needle):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    text = str(err.value) + str(err.value.__cause__)
    assert needle in text


def test_unknown_group_option():
    with pytest.raises(MissingConfigException, match="optim/nope"):
        compose(["optim=nope"])


@pytest.mark.parametrize(
    "overrides,world,field",
    [
        (["optim.lr=-1"], 1, "optim.lr"),
        (["train.seq_len=4096"], 1, "train.seq_len"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], 1, "train.global_batch_size"),
        (["train.global_batch_size=8", "train.micro_batch_size=8"], 2, "train.global_batch_size"),
        (["data=text", "data.paths=[/nonexistent/*.txt]"], 1, "data.paths"),
        (["model.n_kv_heads=3"], 1, "model.n_kv_heads"),
        (["attention.kind=bogus"], 1, "attention.kind"),
        (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode"),
        (["parallel.tp=2"], 1, "parallel"),
        (["resume=/nonexistent/ckpt"], 1, "resume"),
        (["data.tokenizer=/nonexistent/tokenizer.json"], 1, "data.tokenizer"),
    ],
)
def test_illegal_values_raise_naming_the_field(overrides, world, field):
    cfg = compose(overrides, run_dir="/tmp/x")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert err.value.field == field
    assert field in str(err.value)


def test_choice_error_lists_allowed_values():
    cfg = compose(["train.precision=fp8"], run_dir="/tmp/x")
    with pytest.raises(ConfigError, match="allowed: auto, bf16, fp32"):
        validate(cfg)


def test_cli_prints_job_config():
    out = subprocess.run([sys.executable, "-m", "sparsetron.train", "--cfg", "job", "model=125m"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dim: 768" in out.stdout and "optim:" in out.stdout


def test_cli_bad_value_is_one_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparsetron.train", f"run_dir={tmp_path}/r", "optim.lr=-0.1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "optim.lr" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # nothing was started


def test_sparsity_group():
    cfg = compose(["sparsity=nm48"], run_dir="/tmp/x")
    validate(cfg)
    assert (cfg.sparsity.n, cfg.sparsity.m, cfg.sparsity.enabled) == (4, 8, True)
    assert compose([], run_dir="/tmp/x").sparsity.enabled is False
    with pytest.raises(ConfigError, match="sparsity.n"):
        validate(compose(["sparsity=nm24", "sparsity.n=4"], run_dir="/tmp/x"))
