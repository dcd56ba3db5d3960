"""The learning-rate schedule (train/optim.py lr_at): update k = step + 1 of T warms up to the peak at
k = W, then decays with progress (k - W) / (T - W) so that the last update is at the floor."""

import math
from types import SimpleNamespace

import pytest

from sparsetron.train.optim import lr_at

LR, RATIO = 3e-3, 0.1
FLOOR = LR * RATIO


def _cfg(schedule="cosine", warmup=2):
    return SimpleNamespace(lr=LR, min_lr_ratio=RATIO, schedule=schedule, warmup_steps=warmup)


def _all(cfg, steps):
    return [lr_at(s, cfg, steps) for s in range(steps)]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 1, 2, 5])
def test_peak_once_and_the_last_update_on_the_floor(schedule, warmup):
    steps = 20
    lrs = _all(_cfg(schedule, warmup), steps)
    assert lrs.count(LR) == 1, lrs  # the peak is used by exactly one update
    peak_step = max(warmup - 1, 0)  # 0-based step of the W-th update (the first one without warmup)
    assert lrs[peak_step] == LR
    assert lrs[-1] == pytest.approx(FLOOR, rel=1e-12)  # the floor is reached by the last update
    assert min(lrs[peak_step:]) == lrs[-1]
    decay = lrs[peak_step:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after the peak


@pytest.mark.parametrize("warmup", [1, 4])
def test_warmup_values(warmup):
    lrs = _all(_cfg("cosine", warmup), 20)
    assert lrs[:warmup] == pytest.approx([LR * k / warmup for k in range(1, warmup + 1)])


def test_first_peak_and_last_values_by_hand():
    """T = 20, W = 2: updates 3..20 use progress 1/18 .. 18/18."""
    cos, lin = _cfg("cosine", 2), _cfg("linear", 2)
    assert lr_at(0, cos, 20) == pytest.approx(LR / 2)  # first update
    assert lr_at(1, cos, 20) == LR  # peak (update 2 = W)
    third = FLOOR + (LR - FLOOR) * 0.5 * (1 + math.cos(math.pi / 18))
    assert lr_at(2, cos, 20) == pytest.approx(third, rel=1e-12)
    assert lr_at(2, lin, 20) == pytest.approx(LR - (LR - FLOOR) / 18, rel=1e-12)
    assert lr_at(10, lin, 20) == pytest.approx(LR - (LR - FLOOR) * 9 / 18, rel=1e-12)  # update 11: halfway
    assert lr_at(19, cos, 20) == pytest.approx(FLOOR) and lr_at(19, lin, 20) == pytest.approx(FLOOR)
    # no warmup: update 1 at the peak, progress (k - 1) / (T - 1)
    assert lr_at(0, _cfg("linear", 0), 11) == LR and lr_at(5, _cfg("linear", 0), 11) == pytest.approx((LR + FLOOR) / 2)


def test_constant_schedule_and_warmup_longer_than_the_run():
    assert _all(_cfg("constant", 2), 6) == pytest.approx([LR / 2, LR, LR, LR, LR, LR])
    assert _all(_cfg("cosine", 10), 4) == pytest.approx([LR * k / 10 for k in range(1, 5)])  # never past warmup


def test_trainer_logs_the_schedule(tmp_path):
    """The lr in metrics.jsonl of a real (tiny) run is lr_at's, update by update, and ends on the floor."""
    from omegaconf import OmegaConf

    from sparsetron.tests.helpers import TINY, run_cli
    from sparsetron.train.metrics import read_metrics

    run = tmp_path / "run"
    run_cli([*TINY, f"run_dir={run}", "train.max_steps=6", "train.eval_every=0", "checkpoint.every=0",
             "checkpoint.save_final=false", "optim.schedule=linear"])
    cfg = OmegaConf.load(run / "config.yaml")
    train = read_metrics(str(run))["train"]
    assert [train[k]["lr"] for k in range(1, 7)] == pytest.approx([lr_at(s, cfg.optim, 6) for s in range(6)])
    assert train[6]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)
    assert train[2]["lr"] == cfg.optim.lr
