"""The legality matrix: which parallel layouts run, checked before any process group is built.

Every refusal is one ConfigError that names the field, the combination, and what to use instead.
`resolve_engine` is the single place that decides which engine runs a legal layout; the README's
"Parallel layouts" table is the prose form of `check_layout`."""

from typing import Optional

from sparsetron.configs.schema.validate import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
ENGINES = ("auto", "native", "deepspeed")
OFFLOAD = ("none", "cpu", "nvme")


def data_parallel_size(p, world_size: int) -> int:
    return p.dp if p.dp > 0 else max(world_size // (p.tp * p.pp * p.cp), 1)


def resolve_engine(p) -> str:
    """native: DDP / TP / PP / ZeRO-1 (torch ZeroRedundancyOptimizer under PP); deepspeed: ZeRO 0-3 + offload."""
    if p.engine != "auto":
        return p.engine
    if p.pp > 1 or p.ep > 1 or p.cp > 1:  # cp: ZeRO-1 too, on the native engine (context_parallel.py)
        return "native"
    uses_deepspeed = p.zero_stage > 0 or p.offload_optimizer != "none" or p.offload_param != "none"
    return "deepspeed" if uses_deepspeed else "native"


def micro_batches_per_step(t, dp: int) -> int:
    return t.global_batch_size // (t.micro_batch_size * dp)


def _fields(p) -> None:
    for name in ("tp", "pp", "cp", "ep", "pp_virtual_stages"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}", f"got {getattr(p, name)}, must be >= 1")
    if p.dp != -1 and p.dp < 1:
        raise ConfigError("parallel.dp", f"got {p.dp}, must be >= 1 or -1 (the rest of the world size)")
    choices = {"zero_stage": (0, 1, 2, 3), "backend": ("auto", "nccl", "gloo"), "engine": ENGINES,
               "pp_schedule": SCHEDULES, "offload_optimizer": OFFLOAD, "offload_param": OFFLOAD}
    for name, allowed in choices.items():
        if getattr(p, name) not in allowed:
            raise ConfigError(f"parallel.{name}", f"got {getattr(p, name)!r}, allowed: {', '.join(map(str, allowed))}")


def _tensor_parallel(p, m, attn_kind: str, seq_len: int) -> None:
    if p.tp == 1:
        if p.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", "needs parallel.tp > 1 (it shards what TP replicates)")
        return
    for name in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        if getattr(m, name) % p.tp:
            raise ConfigError("parallel.tp", f"model.{name}={getattr(m, name)} is not divisible by tp={p.tp}; "
                                             f"pick a tp that divides heads, kv-heads, ffn_dim and vocab_size")
    if m.mlp != "swiglu" or attn_kind != "dense":
        raise ConfigError("parallel.tp", f"tensor parallel splits dense attention and the SwiGLU MLP only (got "
                                         f"attention.kind={attn_kind}, model.mlp={m.mlp}); for MoE use parallel.ep")
    if p.sequence_parallel and seq_len % p.tp:
        raise ConfigError("parallel.sequence_parallel", f"train.seq_len={seq_len} is not divisible by tp={p.tp}")


def _pipeline(p, m, t, dp: int) -> None:
    v, stages = p.pp_virtual_stages, p.pp * p.pp_virtual_stages
    if p.pp == 1:
        if v != 1 or p.pp_layers:
            raise ConfigError("parallel.pp_virtual_stages", "virtual stages / pp_layers need parallel.pp > 1")
        return
    need_v = {"gpipe": ("== 1", v == 1), "1f1b": ("== 1", v == 1), "interleaved_1f1b": (">= 2", v >= 2),
              "zbv": ("== 2", v == 2)}.get(p.pp_schedule, ("", True))
    if not need_v[1]:
        raise ConfigError("parallel.pp_virtual_stages",
                          f"pp_schedule={p.pp_schedule} needs pp_virtual_stages {need_v[0]}, got {v}")
    if p.pp_layers:
        if len(p.pp_layers) != stages or min(p.pp_layers) < 1 or sum(p.pp_layers) != m.n_layers:
            raise ConfigError("parallel.pp_layers", f"{list(p.pp_layers)} must have pp*virtual={stages} entries, "
                                                    f"each >= 1, summing to model.n_layers={m.n_layers}")
    elif m.n_layers % stages:
        raise ConfigError("parallel.pp", f"model.n_layers={m.n_layers} is not divisible by pp*virtual stages = "
                                         f"{p.pp}*{v}; change pp/pp_virtual_stages or list parallel.pp_layers")
    n_micro = micro_batches_per_step(t, dp)
    if p.pp_schedule != "gpipe" and n_micro < p.pp:
        raise ConfigError("train.global_batch_size",
                          f"pp_schedule={p.pp_schedule} needs micro-batches per step >= pp ({n_micro} < {p.pp}); "
                          f"micro-batches = global_batch_size / (micro_batch_size * dp) = {t.global_batch_size} / "
                          f"({t.micro_batch_size} * {dp}); raise global_batch_size or lower micro_batch_size")
    if p.pp_schedule in ("interleaved_1f1b", "zero_bubble", "zbv") and n_micro % p.pp:
        raise ConfigError("train.global_batch_size",
                          f"pp_schedule={p.pp_schedule} needs micro-batches per step ({n_micro}) divisible by pp={p.pp}")


def _zero(p, engine: str) -> None:
    s = p.zero_stage
    if p.pp > 1 and s >= 2:
        raise ConfigError("parallel.zero_stage", f"ZeRO-{s} with pipeline parallel (pp={p.pp}) is refused by DeepSpeed "
                                                 f"(gradient/parameter partitioning breaks per-micro-batch pipeline "
                                                 f"accumulation); use zero_stage=1 with pp, or pp=1 with ZeRO-{s}")
    if p.pp > 1 and engine == "deepspeed":
        raise ConfigError("parallel.engine", f"engine=deepspeed with pp={p.pp}: DeepSpeed's pipeline engine needs its "
                                             f"own PipelineModule and runs only 1F1B; use engine=native (torch "
                                             f"pipelining schedules, ZeRO-1 through ZeroRedundancyOptimizer)")
    if engine == "native" and s >= 2:
        raise ConfigError("parallel.engine", f"engine=native implements ZeRO-0/1 only, got zero_stage={s}; use "
                                             f"engine=deepspeed (or auto) for ZeRO-2/3")
    offloading = p.offload_optimizer != "none" or p.offload_param != "none"
    if offloading and engine != "deepspeed":
        raise ConfigError("parallel.engine", "offload_optimizer/offload_param run through DeepSpeed; use "
                                             "engine=deepspeed (or auto) with pp=1")
    if p.offload_optimizer != "none" and s == 0:
        raise ConfigError("parallel.offload_optimizer", "optimizer offload partitions optimizer state: needs "
                                                        "zero_stage >= 1 (ZeRO-Offload), 3 for ZeRO-Infinity")
    if p.offload_param != "none" and s != 3:
        raise ConfigError("parallel.offload_param", f"parameter offload is a ZeRO-3 feature (ZeRO-Infinity), got "
                                                    f"zero_stage={s}; use zero_stage=3")
    if "nvme" in (p.offload_optimizer, p.offload_param) and not p.nvme_path:
        raise ConfigError("parallel.nvme_path", "NVMe offload needs a directory on a fast local disk")


def cp_block_multiple(attn) -> int:
    """What each of context parallel's 2*cp sequence chunks must be a multiple of: the block of the
    attention's block lists, which a chunk's queries start on (1 for dense attention)."""
    kind = getattr(attn, "kind", "dense")
    if kind == "nsa":
        return max(attn.block_size, attn.select_block)  # powers of two: the larger is a multiple of both
    if kind == "moba":
        return attn.moba_block
    if kind == "sliding_window":
        return attn.block_size
    return 1


def _context_parallel(cfg) -> None:
    p, t = cfg.parallel, cfg.train
    if p.cp == 1:
        return
    if p.pp > 1:
        raise ConfigError("parallel.cp", f"cp={p.cp} with pp={p.pp}: context parallel does not run under pipeline "
                                         f"parallel yet (the stages would need the shard's positions and the "
                                         f"whole-sequence loss); use cp=1 with pp, or pp=1")
    if p.engine == "deepspeed" or p.zero_stage >= 2 or p.offload_optimizer != "none" or p.offload_param != "none":
        raise ConfigError("parallel.cp", f"cp={p.cp} runs on the native engine (dp, ZeRO-1, tp + sequence parallel); "
                                         f"DeepSpeed (engine=deepspeed, ZeRO-2/3, offload) would average gradients "
                                         f"over dp only; use zero_stage<=1 without offload (engine auto or native), "
                                         f"or use cp=1")
    if p.ep > 1 or cfg.model.mlp == "moe":
        raise ConfigError("parallel.cp", f"cp={p.cp} with model.mlp={cfg.model.mlp}: MoE routing statistics and expert "
                                         f"gradients are not split over cp yet; use cp=1 for MoE")
    if getattr(getattr(cfg, "sparsity", None), "enabled", False):
        raise ConfigError("parallel.cp", "N:M fine-tuning is not built for context parallel (its distillation "
                                         "objective reads the hidden states of whole sequences); use cp=1")
    block = cp_block_multiple(cfg.attention)
    if t.seq_len % (2 * p.cp * block):
        where = f", each a whole number of {block}-token attention blocks" if block > 1 else ""
        raise ConfigError("train.seq_len", f"{t.seq_len} must be a multiple of 2*cp*{block} = {2 * p.cp * block}: "
                                           f"context parallel cuts each sequence into 2*cp = {2 * p.cp} chunks{where}")
    if p.sequence_parallel and (t.seq_len // p.cp) % p.tp:
        raise ConfigError("parallel.sequence_parallel", f"each cp rank's {t.seq_len // p.cp} tokens (train.seq_len / "
                                                        f"cp) must divide by tp={p.tp}")


def _expert_parallel(p, m, moe, engine: str, dp: int) -> None:
    if p.ep == 1:
        return
    if m.mlp != "moe":
        raise ConfigError("parallel.ep", f"expert parallel needs model.mlp=moe, got {m.mlp}")
    if dp % p.ep:
        raise ConfigError("parallel.ep", f"ep={p.ep} is carved out of data parallel: dp={dp} must be divisible by it")
    if moe.num_experts % p.ep:
        raise ConfigError("parallel.ep", f"moe.num_experts={moe.num_experts} is not divisible by ep={p.ep}")
    if engine != "native" or p.tp > 1 or p.pp > 1 or p.zero_stage:
        raise ConfigError("parallel.ep", "expert parallel runs on engine=native with tp=1, pp=1, zero_stage=0 "
                                         "(expert grads reduce over the expert-data-parallel group)")


def _row_parallel_layers(layers, m) -> list:
    """(name, in_features) of the row-parallel linears (split over their inputs by TP) that the
    sparsity.layers patterns select."""
    import fnmatch

    head_dim = getattr(m, "head_dim", None) or m.dim // m.n_heads
    rows = [("layers.0.attn.o_proj", m.n_heads * head_dim), ("layers.0.mlp.down_proj", m.ffn_dim)]
    return [(name, n_in) for name, n_in in rows if any(fnmatch.fnmatchcase(name, pat) for pat in layers)]


def _sparsity(cfg, engine: str) -> None:
    """N:M fine-tuning (train/sparsity/recipe.py) on every engine: masks on the shards each rank holds,
    the teacher placed like the student. What is not built (or not tested) is refused here."""
    s, p = cfg.sparsity, cfg.parallel
    if not getattr(s, "enabled", False):
        return
    if p.ep > 1:
        raise ConfigError("parallel.ep", f"N:M fine-tuning with expert parallel (ep={p.ep}) is not built (expert "
                                         f"weights are grouped tensors, not linear layers); use ep=1")
    if engine == "deepspeed":
        if p.tp > 1:
            raise ConfigError("parallel.tp", f"N:M fine-tuning under DeepSpeed runs with tp=1 (ZeRO 0-3 over dp); "
                                             f"for tp={p.tp} use engine=native (zero_stage 0 or 1)")
        if s.mode == "fixed":
            raise ConfigError("sparsity.mode", "mode=fixed zeroes pruned weights after each step, which under "
                                               "DeepSpeed would have to reach its partitioned fp32 master weights; "
                                               "use mode=srste, or engine=native (zero_stage 0 or 1)")
        if p.offload_param != "none":
            raise ConfigError("parallel.offload_param", "N:M fine-tuning with parameter offload is not tested; use "
                                                        "offload_param=none (offload_optimizer is fine)")
    if p.tp > 1 and isinstance(s.m, int) and s.m > 0:
        for name, n_in in _row_parallel_layers(s.layers, cfg.model):
            if (n_in // p.tp) % s.m:
                raise ConfigError("sparsity.m", f"tensor parallel splits {name.split('.', 2)[-1]}'s {n_in} inputs "
                                                f"into tp={p.tp} shards of {n_in // p.tp}, which must be whole groups "
                                                f"of m={s.m} (N:M groups run along the inputs); pick m dividing "
                                                f"{n_in // p.tp}, another tp, or leave that layer out of "
                                                f"sparsity.layers")


def check_layout(cfg, world_size: Optional[int]) -> None:
    """Raise ConfigError for the first illegal parallel choice. Without world_size only the fields
    that do not depend on it are checked."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    _fields(p)
    engine = resolve_engine(p)
    _tensor_parallel(p, m, cfg.attention.kind, t.seq_len)
    _context_parallel(cfg)
    _zero(p, engine)
    _sparsity(cfg, engine)
    if world_size is None:
        return
    dp = data_parallel_size(p, world_size)
    if p.tp * p.pp * p.cp * dp != world_size:
        raise ConfigError("parallel", f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{dp} must equal the world size "
                                      f"{world_size}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not divisible by micro_batch_size*dp "
                                                     f"= {t.micro_batch_size}*{dp}")
    _pipeline(p, m, t, dp)
    _expert_parallel(p, m, cfg.moe, engine, dp)
