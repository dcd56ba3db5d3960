"""Hugging Face Llama import/export is exact or refuses (issue 14, item 1).

Random `transformers.LlamaForCausalLM` models at odd shapes (GQA 3, vocab 1000, head_dim != hidden /
heads, tied and untied) for every supported RoPE type must import with max |delta logit| <= 1e-4 in
fp32 and survive export -> from_pretrained; every config field sparsetron cannot compute exactly is a
one-line CheckpointError naming it; with train.init_from the checkpoint's fields win and a conflicting
explicit value is refused with both values named.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from sparsetron.configs.schema import ModelConfig
from sparsetron.train.checkpoint import CheckpointError
from sparsetron.train.hf import export_hf, import_hf
from sparsetron.train.model import Llama

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 1000, 48
SHAPE = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=3e-5,
             initializer_range=0.1)
THETA = 50000.0
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 3.5},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    # original context 64: wavelengths of this head span the high, smoothed and low-frequency bands
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 32, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "beta_fast": 16.0, "truncate": False},
}


def save_hf(folder, rope=None, tie=False, seed=0, **overrides) -> "transformers.LlamaForCausalLM":
    """A random HF Llama saved to `folder` (norm weights away from 1 so a wrong norm mapping shows).
    Built from rope_scaling + rope_theta, which every transformers version reads; transformers 5
    saves it as `rope_parameters` (its own layout), 4 as given."""
    torch.manual_seed(seed)
    kw = {**SHAPE, "tie_word_embeddings": tie, "rope_theta": THETA, **overrides}
    if rope is not None:
        kw["rope_scaling"] = dict(rope)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    return model


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def max_delta(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("rope_name,tie", [("default", True), ("linear", False), ("dynamic", True),
                                           ("llama3", False), ("llama3", True), ("yarn", False),
                                           ("yarn_mscale", True)])
def test_import_matches_transformers_and_round_trips(tmp_path, rope_name, tie):
    rope = ROPES[rope_name]
    hf = save_hf(tmp_path / "hf", rope, tie=tie)
    ours = import_hf(str(tmp_path / "hf")).eval()
    assert ours.cfg.rope_type == (rope or {"rope_type": "default"})["rope_type"]
    assert ours.cfg.head_dim == 24 and ours.cfg.tie_embeddings == tie and ours.cfg.norm_eps == 3e-5
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    reference = logits(hf, tokens)
    assert reference.abs().max() > 1.0  # logits large enough that a wrong RoPE or norm would show
    assert max_delta(logits(ours, tokens), reference) <= 1e-4

    if rope_name not in ("default", "dynamic"):  # the scaling matters at this length: plain RoPE differs
        plain = Llama(dataclasses.replace(ours.cfg, rope_type="default")).eval()
        plain.load_state_dict(ours.state_dict())
        assert max_delta(logits(plain, tokens), reference) > 1e-2

    export_hf(ours, str(tmp_path / "out"))  # round trip: ours -> HF folder -> transformers and back
    again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert max_delta(logits(again, tokens), reference) <= 1e-4
    back = import_hf(str(tmp_path / "out")).eval()
    assert back.cfg == ours.cfg
    assert torch.equal(logits(back, tokens), logits(ours, tokens))


def test_legacy_rope_scaling_and_theta_layout(tmp_path):
    hf = save_hf(tmp_path / "hf", ROPES["llama3"], seed=3)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)  # written as a transformers-4 checkpoint would be
    config["rope_scaling"] = dict(ROPES["llama3"])
    config["rope_theta"] = THETA
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    ours = import_hf(str(tmp_path / "hf")).eval()
    assert (ours.cfg.rope_type, ours.cfg.rope_theta, ours.cfg.rope_factor) == ("llama3", THETA, 8.0)
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    assert max_delta(logits(ours, tokens), logits(hf, tokens)) <= 1e-4


def test_oldest_rope_scaling_spelling(exported, tmp_path):
    """{"type": "linear", "factor": 2.0} (no rope_type: Llama-2-era configs) is read as transformers does."""
    folder = edited(exported, tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    ours = import_hf(folder).eval()
    assert (ours.cfg.rope_type, ours.cfg.rope_factor) == ("linear", 2.0)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 64, (1, SEQ))
    assert max_delta(logits(ours, tokens), logits(theirs, tokens)) <= 1e-4


def test_omitted_fields_take_transformers_defaults(tmp_path):
    hf = save_hf(tmp_path / "hf", seed=4, rms_norm_eps=1e-6, head_dim=16)  # head_dim = hidden / heads
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rms_norm_eps", "tie_word_embeddings", "hidden_act", "head_dim", "attention_bias", "mlp_bias"):
        config.pop(key, None)  # LlamaConfig: 1e-6, False, silu, hidden / heads, no biases
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    ours = import_hf(str(tmp_path / "hf")).eval()
    assert ours.cfg.norm_eps == 1e-6 and ours.cfg.head_dim is None and not ours.cfg.tie_embeddings
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    assert max_delta(logits(ours, tokens), logits(hf, tokens)) <= 1e-4


def test_fused_rope_kernel_uses_the_scaled_tables(tmp_path, monkeypatch):
    """kernels/rope reads the same cos/sin tables: fused_kernels=true must give the same logits."""
    from sparsetron.kernels._triton import triton_usable

    hf = save_hf(tmp_path / "hf", ROPES["yarn"], seed=5)  # yarn: scaled frequencies and scaled cos/sin
    ours = import_hf(str(tmp_path / "hf")).eval()
    fused = Llama(dataclasses.replace(ours.cfg, fused_kernels=True)).eval()
    fused.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 19))
    if not triton_usable(tokens):
        pytest.skip("no GPU and no Triton interpreter: the fused path falls back to the reference")
    from sparsetron.kernels.rope.function import RoPEFunction

    calls, original = [], RoPEFunction.apply
    monkeypatch.setattr(RoPEFunction, "apply", staticmethod(lambda *a: calls.append(1) or original(*a)))
    out = logits(fused, tokens)
    assert len(calls) == ours.cfg.n_layers  # the Triton kernel ran, once per layer
    reference = logits(hf, tokens)
    assert max_delta(logits(ours, tokens), reference) <= 1e-4
    assert max_delta(out, reference) <= 1e-4


# --- refusals: one line each, naming the field -------------------------------------------------------

BASE = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "base"
    export_hf(Llama(ModelConfig(**BASE)), str(folder))
    return folder


def edited(exported, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def refused(folder, *needles):
    with pytest.raises(CheckpointError) as err:
        import_hf(folder)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_refuses_hidden_act_gelu(exported, tmp_path):
    refused(edited(exported, tmp_path, hidden_act="gelu"), "hidden_act='gelu'", "silu")


def test_refuses_attention_bias(exported, tmp_path):
    refused(edited(exported, tmp_path, attention_bias=True), "attention_bias=true", "attention_bias=false")


def test_refuses_mlp_bias(exported, tmp_path):
    refused(edited(exported, tmp_path, mlp_bias=True), "mlp_bias=true", "mlp_bias=false")


def test_refuses_attention_dropout(exported, tmp_path):
    refused(edited(exported, tmp_path, attention_dropout=0.1), "attention_dropout=0.1", "0.0")


def test_refuses_longrope(exported, tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    refused(edited(exported, tmp_path, rope_parameters=rope), "rope_parameters.rope_type='longrope'", "llama3")


def test_refuses_partial_rotary_factor(exported, tmp_path):
    refused(edited(exported, tmp_path, partial_rotary_factor=0.5), "partial_rotary_factor=0.5", "1.0")


def test_refuses_llama3_without_its_parameters(exported, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}
    refused(edited(exported, tmp_path, rope_scaling=rope), "rope_scaling.low_freq_factor", "llama3")


def test_refuses_rope_per_layer_type(exported, tmp_path):
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    refused(edited(exported, tmp_path, rope_parameters=rope), "rope_parameters is nested")


def test_refuses_quantized_weights(exported, tmp_path):
    refused(edited(exported, tmp_path, quantization_config={"quant_method": "bitsandbytes"}), "quantization_config")


def test_refuses_another_architecture(exported, tmp_path):
    refused(edited(exported, tmp_path, model_type="mistral"), "model_type='mistral'", "'llama'")


def test_refuses_odd_head_dim(exported, tmp_path):
    refused(edited(exported, tmp_path, head_dim=15), "model.head_dim", "even")


def test_refuses_a_tied_head_that_differs(exported, tmp_path):
    folder = edited(exported, tmp_path, tie_word_embeddings=True)
    from safetensors.torch import load_file, save_file

    weights = load_file(f"{folder}/model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1
    save_file(weights, f"{folder}/model.safetensors")
    refused(folder, "tie_word_embeddings=true", "lm_head.weight")


def test_dynamic_rope_refuses_a_longer_model(tmp_path):
    from sparsetron.configs.schema.model import check_model_fields
    from sparsetron.configs.schema.validate import ConfigError

    cfg = ModelConfig(**{**BASE, "rope_type": "dynamic", "rope_factor": 2.0, "rope_original_max_seq_len": 32})
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        check_model_fields(cfg, ConfigError)
    with pytest.raises(ConfigError, match="model.rope_type"):
        check_model_fields(ModelConfig(**{**BASE, "rope_type": "ntk"}), ConfigError)


def test_schema_validates_rope_and_head_dim_fields():
    """The new model.* fields go through validate(): a bad value is one ConfigError naming the field."""
    from sparsetron.configs.schema.validate import ConfigError, validate

    cfg = compose("model.head_dim=40", "model.rope_type=llama3", "model.rope_factor=8",
                  "model.rope_original_max_seq_len=256")
    validate(cfg)
    model = Llama(cfg.model)
    assert model.layers[0].attn.q_proj.weight.shape == (8 * 40, 256)  # wider heads than dim / n_heads = 32
    assert model.rope_cos.shape == (1024, 20)
    for override, field in (("model.rope_type=ntk", "model.rope_type"), ("model.head_dim=33", "model.head_dim"),
                            ("model.rope_factor=0.5", "model.rope_factor")):
        bad = compose(override, "model.rope_type=linear" if "factor" in override else "model.name=tiny")
        with pytest.raises(ConfigError, match=field):
            validate(bad)


# --- train.init_from: the checkpoint's fields win, explicit conflicts are refused --------------------

@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama3"
    hf = save_hf(folder, ROPES["llama3"], seed=7)
    return folder, hf


def compose(*overrides):
    from sparsetron.train.cli import compose as hydra_compose

    return hydra_compose(list(overrides))


def test_init_from_adopts_the_checkpoint_fields(llama3_folder):
    from sparsetron.train.pretrained import adopt_hf_model_config, load_pretrained

    folder, hf = llama3_folder
    cfg = compose(f"train.init_from={folder}", "model.fused_kernels=false")
    changed = adopt_hf_model_config(cfg, announce=False)
    assert changed["rope_type"] == ("default", "llama3") and changed["rope_theta"] == (10000.0, THETA)
    assert (cfg.model.head_dim, cfg.model.norm_eps, cfg.model.max_seq_len) == (24, 3e-5, 256)
    model = Llama(cfg.model).eval()
    assert load_pretrained(model, str(folder)) == "hf"
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    assert max_delta(logits(model, tokens), logits(hf, tokens)) <= 1e-4
    assert adopt_hf_model_config(cfg, announce=False) == {}  # adopted: now nothing conflicts or changes


def test_init_from_refuses_explicit_conflicts_naming_both_values(llama3_folder):
    from sparsetron.train.pretrained import adopt_hf_model_config

    folder, _ = llama3_folder
    cfg = compose(f"train.init_from={folder}", "model.rope_theta=20000", "model.n_layers=3",
                  "model.rope_type=linear")
    with pytest.raises(CheckpointError) as err:
        adopt_hf_model_config(cfg, announce=False)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("model.rope_theta: checkpoint 50000.0, run 20000.0", "model.rope_type: checkpoint 'llama3', run 'linear'",
                   "model.n_layers: checkpoint 2, run 3"):
        assert needle in message, message


def test_init_from_a_preset_with_other_shapes_is_refused(llama3_folder):
    from sparsetron.train.pretrained import adopt_hf_model_config

    folder, _ = llama3_folder
    with pytest.raises(CheckpointError, match=r"model.dim: checkpoint 96, run 768"):
        adopt_hf_model_config(compose("model=125m", f"train.init_from={folder}"), announce=False)


def test_init_from_command_line_value_equal_to_the_default_still_counts(llama3_folder, monkeypatch):
    """Under Hydra a `model.norm_eps=1e-5` override (the schema default) is explicit too."""
    from sparsetron.train import pretrained

    folder, _ = llama3_folder
    monkeypatch.setattr(pretrained, "_command_line_model_keys", lambda: {"norm_eps"})
    with pytest.raises(CheckpointError, match=r"model.norm_eps: checkpoint 3e-05, run 1e-05"):
        pretrained.adopt_hf_model_config(compose(f"train.init_from={folder}"), announce=False)


def test_load_pretrained_refuses_a_model_built_with_other_fields(llama3_folder):
    """A caller that skips the adoption (Trainer built by hand) cannot load into plain RoPE."""
    from sparsetron.train.hf import read_hf
    from sparsetron.train.pretrained import load_pretrained

    folder, _ = llama3_folder
    fields, _ = read_hf(str(folder))
    model = Llama(ModelConfig(**{**fields, "rope_type": "default"}))
    with pytest.raises(CheckpointError, match=r"model.rope_type='llama3'"):
        load_pretrained(model, str(folder))


def test_fine_tune_from_hf_then_export_end_to_end(tmp_path):
    """`sparsetron-train train.init_from=<HF llama3 folder>` (no model overrides) adopts the checkpoint's
    fields, trains, and the exported checkpoint loads in transformers with the same logits."""
    from sparsetron.train.export import load_model_from_checkpoint
    from tests.helpers import run_cli

    save_hf(tmp_path / "hf", ROPES["llama3"], seed=8, vocab_size=512, max_position_embeddings=128)
    common = [f"train.init_from={tmp_path / 'hf'}", "train.seq_len=64", "train.global_batch_size=4",
              "train.micro_batch_size=4", "data.max_corpus_bytes=200000", "train.eval_batches=1", "train.max_steps=1",
              "logging.wandb.mode=disabled", "logging.progress_bar=false", "logging.plot=false"]
    refused = run_cli([*common, f"run_dir={tmp_path / 'no'}", "model.norm_eps=1e-5"], check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]  # 1e-5 is the schema default, but typed on the CLI
    assert "model.norm_eps: checkpoint 3e-05, run 1e-05" in refused.stderr.strip().splitlines()[-1]

    out = run_cli([*common, f"run_dir={tmp_path / 'run'}"])
    assert "model.rope_type='llama3'" in out.stdout and "initialised from hf weights" in out.stdout
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    ours = load_model_from_checkpoint(str(step)).eval()
    assert (ours.cfg.rope_type, ours.cfg.head_dim, ours.cfg.max_seq_len) == ("llama3", 24, 128)
    export_hf(ours, str(tmp_path / "out"))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 512, (1, SEQ))
    assert max_delta(logits(ours, tokens), logits(theirs, tokens)) <= 1e-4


def test_hf_cli_prints_fields_or_one_error_line(exported, tmp_path, capsys):
    from sparsetron.train.hf import main

    assert main([str(exported)]) == 0
    assert "model.rope_type=default" in capsys.readouterr().out
    assert main([edited(exported, tmp_path, hidden_act="relu")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "hidden_act='relu'" in err and "\n" not in err
