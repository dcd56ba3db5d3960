"""Checks that need more than a type: ranges, choices, and how fields relate. Every failure is one
`ConfigError` naming the field and what is allowed, raised before any work starts."""

import glob
import os
from typing import Any, Iterable, Optional


class ConfigError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"invalid config: {field}: {message}")


def _choice(field: str, value: Any, allowed: Iterable) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(field, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")


def _positive(field: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(field, f"got {value}, must be {'>= 0' if allow_zero else '> 0'}")


def _switch(field: str, value: Any, words: tuple) -> None:
    """A true/false field that also takes words (auto, ...): typed Any in the schema, so checked here
    (1 or "yes" would otherwise pass as truthy)."""
    if not (isinstance(value, bool) or value in words):
        raise ConfigError(field, f"got {value!r}, allowed: true, false, {', '.join(words)}")


def _model(m) -> None:
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    from .model import check_model_fields

    check_model_fields(m, ConfigError)  # head width and RoPE scaling (configs/schema/model.py)
    if m.n_heads % m.n_kv_heads:
        raise ConfigError("model.n_kv_heads", f"n_heads={m.n_heads} is not divisible by n_kv_heads={m.n_kv_heads}")
    _choice("model.mlp", m.mlp, ["swiglu", "moe"])
    _choice("model.activation_checkpointing", m.activation_checkpointing, ["none", "attention", "selective", "full"])
    _switch("model.fused_kernels", m.fused_kernels, ("auto", "loss"))


def _moe(m) -> None:
    _positive("moe.num_experts", m.num_experts)
    _positive("moe.expert_ffn_dim", m.expert_ffn_dim)
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError("moe.top_k", f"got {m.top_k}, must be in [1, moe.num_experts={m.num_experts}]")
    _choice("moe.score_func", m.score_func, ["softmax", "sigmoid"])
    _choice("moe.load_balancing", m.load_balancing, ["aux_loss", "aux_free", "none"])
    _choice("moe.implementation", m.implementation, ["auto", "triton", "torch", "grouped_mm"])
    _positive("moe.tile_m", m.tile_m)
    _positive("moe.shared_expert_ffn_dim", m.shared_expert_ffn_dim, allow_zero=True)
    for name in ("aux_loss_coef", "z_loss_coef", "aux_free_bias_lr"):
        _positive(f"moe.{name}", getattr(m, name), allow_zero=True)
    from .moe import check_moe_fields

    check_moe_fields(m, ConfigError)  # capacity factor and its clash with token rounding (configs/schema/moe.py)


def _data(d) -> None:
    _choice("data.source", d.source, ["stdlib", "pycode", "text", "memmap", "prepared"])
    if d.source == "prepared":
        from .data import check_sources

        check_sources(d)
    _choice("data.memmap_dtype", d.memmap_dtype, ["uint16", "uint32"])
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"got {d.val_fraction}, must be in (0, 1)")
    _positive("data.max_corpus_bytes", d.max_corpus_bytes, allow_zero=True)
    if d.source in ("text", "memmap"):
        if not d.paths:
            raise ConfigError("data.paths", f"data.source={d.source} needs at least one path or glob")
        for field, patterns in (("data.paths", d.paths), ("data.val_paths", d.val_paths)):
            for pattern in patterns:
                if not glob.glob(os.path.expanduser(pattern), recursive=True):
                    raise ConfigError(field, f"no file matches {pattern!r}")
    if d.tokenizer != "bpe" and not os.path.isfile(os.path.expanduser(d.tokenizer)):
        raise ConfigError("data.tokenizer", f"{d.tokenizer!r} is not a file; use 'bpe' or a tokenizer.json path")


def _optim(o) -> None:
    _choice("optim.name", o.name, ["adamw"])
    _positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"got {o.min_lr_ratio}, must be in [0, 1]")
    _choice("optim.schedule", o.schedule, ["cosine", "linear", "constant"])
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optim.{name}", f"got {getattr(o, name)}, must be in [0, 1)")
    from .optim import check_optim_fields

    check_optim_fields(o, ConfigError)  # offload_impl, eps (configs/schema/optim.py)


def _train(t, m) -> None:
    for name in ("max_steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_batches"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    if t.seq_len > m.max_seq_len:
        raise ConfigError("train.seq_len", f"got {t.seq_len}, must be <= model.max_seq_len={m.max_seq_len}")
    _choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _choice("train.precision", t.precision, ["auto", "bf16", "fp32"])
    _switch("train.compile", t.compile, ("auto",))
    if t.init_from and not os.path.isdir(os.path.expanduser(t.init_from)):
        raise ConfigError("train.init_from", f"{t.init_from!r} is not a directory; give a sparsetron checkpoint "
                          f"(runs/<name>/checkpoints/step_XXXXXXXX) or a Hugging Face Llama folder")


def _parallel(cfg, world_size: Optional[int]) -> None:
    """The legality matrix (sparsetron.parallel.legality): sizes, divisibility, schedules, ZeRO combinations."""
    from sparsetron.parallel.legality import check_layout

    check_layout(cfg, world_size)


def validate(cfg, world_size: Optional[int] = None) -> None:
    """Raise ConfigError for the first illegal field. `world_size` adds the layout checks."""
    _model(cfg.model)
    _choice("attention.kind", cfg.attention.kind, ["dense", "sliding_window", "nsa", "moba"])
    if cfg.model.mlp == "moe":
        _moe(cfg.moe)
    _data(cfg.data)
    _optim(cfg.optim)
    _train(cfg.train, cfg.model)
    _parallel(cfg, world_size)
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ["online", "offline", "disabled"])
    _positive("logging.log_every", cfg.logging.log_every)
    _logging(cfg.logging)
    if cfg.sparsity.enabled:  # which layouts it runs on: parallel/legality.py (_sparsity)
        try:
            _sparsity(cfg.sparsity)
        except ValueError as err:
            raise ConfigError("sparsity", str(err)) from None
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    if cfg.resume not in ("none", "auto") and not os.path.isdir(os.path.expanduser(cfg.resume)):
        raise ConfigError("resume", f"{cfg.resume!r} is not a checkpoint directory; use none, auto or a path")


def _logging(lg) -> None:
    if lg.peak_tflops is not None:
        _positive("logging.peak_tflops", lg.peak_tflops)
    if lg.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            from sparsetron.train.metrics import TENSORBOARD_MISSING

            raise ConfigError("logging.tensorboard", TENSORBOARD_MISSING)


def _sparsity(s) -> None:
    """The sparsity dataclass's own checks, run on the composed (DictConfig) values."""
    from omegaconf import OmegaConf

    (OmegaConf.to_object(s) if OmegaConf.is_config(s) else s).validate()
