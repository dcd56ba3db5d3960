"""Parity harness: train a few steps at several layouts inside one set of processes and record the
losses and the full (consolidated) final weights, for comparison with one process.

    torchrun --nproc-per-node=4 -m sparsetron.tests.parallel_harness OUT.pt LAYOUT_JSON [STEPS]

LAYOUT_JSON is a JSON list of [name, [hydra overrides...]]. Every layout trains the same model
(same seed) on the same synthetic global batches, which each data-parallel rank splits as the
trainer's sampler does, so the math is that of one process up to float summation order.
"""

import json
import os
import sys
from typing import Dict, List, Sequence

import torch

# the tiny model of the end-to-end tests (tests/helpers.TINY) without the data/logging keys
TINY_MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
              "model.vocab_size=512", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
              "optim.warmup_steps=2", "train.precision=fp32", "train.device=cpu"]


def compose_layout(overrides: Sequence[str]):
    from sparsetron.train.cli import compose

    return compose([*TINY_MODEL, *overrides], run_dir="/tmp/unused")


def global_batch(cfg, step: int) -> torch.Tensor:
    """Step `step`'s global batch of token sequences (seq_len + 1 tokens each), the same everywhere:
    arithmetic progressions mod vocab (random start and stride), learnable, so the loss falls."""
    g = torch.Generator().manual_seed(1000 + step)
    t, v = cfg.train, cfg.model.vocab_size
    start = torch.randint(0, v, (t.global_batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (t.global_batch_size, 1), generator=g)
    return (start + stride * torch.arange(t.seq_len + 1)) % v


def rank_batches(cfg, step: int, dp_rank: int, dp_size: int):
    """This dp rank's micro-batches: accumulation step a takes rows (a*dp + r)*micro ... (sampler.py)."""
    t, tokens = cfg.train, global_batch(cfg, step)
    accum = t.global_batch_size // (t.micro_batch_size * dp_size)
    out = []
    for a in range(accum):
        rows = tokens[(a * dp_size + dp_rank) * t.micro_batch_size:][: t.micro_batch_size]
        out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return out


def run_layout(overrides: Sequence[str], runtime, steps: int) -> Dict[str, object]:
    """Train `steps` steps; returns {losses, grad_norms, state (rank 0 only), eval}."""
    from sparsetron.configs.schema.validate import validate
    from sparsetron.parallel.engine import build_engine
    from sparsetron.train.model import Llama
    from sparsetron.train.optim import lr_at

    cfg = compose_layout(overrides)
    validate(cfg, runtime.world_size)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(Llama(cfg.model, cfg.attention, cfg.moe), cfg, runtime)
    losses, norms = [], []
    for step in range(steps):
        batches = [(x.to(runtime.device), y.to(runtime.device))
                   for x, y in rank_batches(cfg, step, engine.dp_rank, engine.dp_size)]
        out = engine.train_step(batches, lr_at(step, cfg.optim, steps))
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
    x, y = rank_batches(cfg, steps, 0, 1)[0]
    eval_loss = float(engine.eval_loss(x.to(runtime.device), y.to(runtime.device)))
    state = consolidated(engine)
    return {"losses": losses, "grad_norms": norms, "eval": eval_loss, "state": state, "engine": engine}


def consolidated(engine):
    if hasattr(engine, "consolidated_state_dict"):
        return engine.consolidated_state_dict()
    raise TypeError(f"{type(engine).__name__} cannot consolidate its weights")


def main(argv: List[str]) -> int:
    from sparsetron.parallel.runtime import init_runtime, shutdown

    out_path, layouts = argv[0], json.loads(argv[1])
    steps = int(argv[2]) if len(argv) > 2 else 5
    runtime = init_runtime("cpu", "gloo", timeout_s=180)
    results = {}
    try:
        for name, overrides in layouts:  # a failure raises: the peers cannot go on alone
            r = run_layout(overrides, runtime, steps)
            r.pop("engine")
            results[name] = r
            runtime.barrier()
        if runtime.is_main:
            torch.save(results, out_path + ".tmp")
            os.replace(out_path + ".tmp", out_path)
    finally:
        shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
