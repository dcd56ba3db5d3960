"""model.fused_kernels / train.compile = auto (train/auto_defaults.py): on for CUDA where supported,
off on the CPU, where a run computes exactly what it did with both false."""

import pytest
import torch
from omegaconf import OmegaConf

from sparsetron.configs.schema.model import ModelConfig
from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.train import auto_defaults
from sparsetron.train.cli import compose
from sparsetron.train.metrics import read_metrics

CUDA = torch.device("cuda")  # a device object only: resolve() never touches the GPU


def _resolve(overrides, device=CUDA):
    cfg = compose(overrides, run_dir="/tmp/x")
    note = auto_defaults.resolve(cfg, device)
    return cfg.train.compile, cfg.model.fused_kernels, note


def test_cpu_turns_auto_off_silently():
    assert _resolve([], torch.device("cpu")) == (False, False, None)


def test_cuda_dense_compiles_blocks_and_keeps_the_triton_loss():
    compile_, fused, note = _resolve(["model=125m"])
    assert compile_ is True and fused == "loss"
    assert "train.compile=auto -> on" in note and "model.fused_kernels=auto -> loss" in note


@pytest.mark.parametrize("overrides, reason", [
    (["model.mlp=moe"], "MoE"), (["attention=nsa"], "attention.kind=nsa"),
    (["parallel=tp_pp"], "tensor/pipeline-parallel"), (["parallel.zero_stage=2"], "DeepSpeed engine"),
])
def test_cuda_auto_compile_off_names_the_reason_and_uses_the_block_kernels(overrides, reason):
    compile_, fused, note = _resolve(overrides)
    assert compile_ is False and fused is True
    assert "train.compile=auto -> off" in note and reason in note and "\n" not in note


@pytest.mark.parametrize("overrides, reason", [
    (["parallel=zero3_offload"], "ZeRO-3 partitions"),  # the kernels read weights outside their modules
    (["model.dim=131072", "model.n_heads=1024", "model.n_kv_heads=1024"], "model.dim=131072"),
])
def test_cuda_kernels_off_where_they_do_not_apply(overrides, reason):
    _, fused, note = _resolve(["train.compile=false", *overrides])
    assert fused is False and f"model.fused_kernels=auto -> off: {reason}" in note


def test_explicit_values_are_kept():
    assert _resolve(["train.compile=false", "model.fused_kernels=false"]) == (False, False, None)
    assert _resolve(["train.compile=true", "model.fused_kernels=true"]) == (True, True, None)
    compile_, fused, _ = _resolve(["train.compile=true"], torch.device("cpu"))
    assert compile_ is True and fused is False  # auto is off on CPU whatever compile is


def test_the_model_reads_an_unresolved_auto_as_off():
    from sparsetron.train.model import Llama

    small = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    for value, blocks in (("auto", False), ("loss", False), (True, True), (False, False)):
        model = Llama(ModelConfig(**small, fused_kernels=value))
        block = model.layers[0]
        assert block.fused is block.attn.fused is block.mlp.fused is blocks, value


def test_default_cpu_run_is_unchanged_by_auto(tmp_path):
    """The default job's settings (auto) and explicit false give the same losses, bit for bit, and the
    saved config records what ran."""
    common = [*TINY, "train.max_steps=3", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false"]
    run_cli([*common, f"run_dir={tmp_path / 'auto'}"])
    run_cli([*common, f"run_dir={tmp_path / 'off'}", "train.compile=false", "model.fused_kernels=false"])
    auto, off = (read_metrics(str(tmp_path / d))["train"] for d in ("auto", "off"))
    assert [auto[s]["loss"] for s in sorted(auto)] == [off[s]["loss"] for s in sorted(off)]
    saved = OmegaConf.load(tmp_path / "auto" / "config.yaml")
    assert saved.train.compile is False and saved.model.fused_kernels is False
