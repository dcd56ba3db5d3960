"""The one training step (parallel/engine_protocol.StepLoop), on the single-process engine: every engine
runs it unchanged; an objective's loss is what backward sees (scaled by 1/n over the micro-batches)
and its "ce" is what the step reports; step hooks see the summed gradients before the update and
the updated weights after it; the non-finite guard skips the update but not the hooks."""

import copy

import pytest
import torch

from sparsetron.parallel.engine import DataParallelEngine
from sparsetron.parallel.engine_protocol import Engine, StepLoop
from sparsetron.parallel.runtime import Runtime
from sparsetron.tests.parallel_harness import compose_layout, rank_batches
from sparsetron.train.model import Llama


def _engine_classes():
    from sparsetron.parallel.deepspeed_engine import DeepSpeedEngine
    from sparsetron.parallel.native import NativeEngine

    return [DataParallelEngine, NativeEngine, DeepSpeedEngine]


def test_every_engine_runs_the_one_step_and_has_the_protocol():
    methods = [name for name, value in vars(Engine).items() if callable(value) and not name.startswith("_")]
    assert {"train_step", "shard_frozen", "full_params", "forward_only"} <= set(methods)
    for cls in _engine_classes():
        assert issubclass(cls, StepLoop) and "train_step" not in vars(cls), f"{cls.__name__} writes its own step"
        assert not [m for m in methods if not callable(getattr(cls, m, None))], cls.__name__


@pytest.fixture
def engine():
    torch.set_num_threads(1)
    cfg = compose_layout(["optim.grad_clip=0"])  # clipping off: gradients compared as they are
    torch.manual_seed(cfg.train.seed)
    return DataParallelEngine(Llama(cfg.model, cfg.attention, cfg.moe), cfg, Runtime())


class Recorder:
    """Step hook keeping what it saw: gradients before the step, weights after it."""

    def __init__(self, engine):
        self.engine, self.calls, self.grads, self.weights = engine, [], None, None

    def before_optimizer_step(self):
        self.calls.append("before")
        self.grads = {n: p.grad.clone() for n, p in self.engine.model.named_parameters() if p.grad is not None}

    def after_optimizer_step(self):
        self.calls.append("after")
        self.weights = {n: p.detach().clone() for n, p in self.engine.model.named_parameters()}


def test_objective_loss_scaling_hooks_and_reported_loss(engine):
    cfg = engine.cfg
    batches = rank_batches(cfg, 0, 0, 1)
    assert len(batches) == 4
    twin = copy.deepcopy(engine.model)
    weight = torch.tensor(0.3)

    def objective(model, x, y):  # a different loss than the logged one: backward must see "loss"
        ce = model(x, y)
        return {"loss": ce + weight * model.embed.weight.pow(2).mean(), "ce": ce * 2}

    engine.objective = objective
    hook = Recorder(engine)
    engine.step_hooks.append(hook)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    out = engine.train_step(batches, lr=1e-2)
    assert hook.calls == ["before", "after"] and not out["skipped"]

    ces = []
    for x, y in batches:  # the same math by hand: mean over micro-batches
        ce = twin(x, y)
        ((ce + weight * twin.embed.weight.pow(2).mean()) / len(batches)).backward()
        ces.append(2 * ce.item())
    assert out["loss"] == pytest.approx(sum(ces) / len(ces), rel=1e-6)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(hook.grads[name], p.grad, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(hook.weights[n], before[n]) for n in before)  # after(): the updated weights
    assert all(p.grad is None for p in engine.model.parameters())  # zeroed for the next step
    assert all(hasattr(engine, name) for name in Engine.__annotations__)  # the protocol's attributes


def test_nonfinite_loss_skips_the_update_on_every_rank_but_runs_the_hooks(engine):
    batches = rank_batches(engine.cfg, 0, 0, 1)
    calls = {"n": 0}

    def objective(model, x, y):
        calls["n"] += 1
        ce = model(x, y)
        bad = ce * float("nan") if calls["n"] == 3 else ce  # one micro-batch goes bad
        return {"loss": bad, "ce": bad}

    engine.objective = objective
    hook = Recorder(engine)
    engine.step_hooks.append(hook)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    out = engine.train_step(batches, lr=1e-2)
    assert out["skipped"] and hook.calls == ["before", "after"]
    assert all(torch.equal(hook.weights[n], before[n]) for n in before)
    out = engine.train_step(batches, lr=1e-2)  # the next step is fine again
    assert not out["skipped"]
