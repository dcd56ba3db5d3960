"""Logs that fit a cluster (train/metrics.py): MFU only against a known or given peak, a progress bar
only on a terminal and plain lines otherwise, TensorBoard with the same scalars as wandb."""

import io
import sys

import pytest
import torch

from sparsetron.configs.schema.validate import ConfigError, validate
from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.train.cli import compose
from sparsetron.train.metrics import (EtaClock, MetricsSink, flops_per_token, gpu_peak_flops, parameter_counts,
                                      peak_flops, progress_line, read_metrics, scalar_metrics)


# ------------------------------------------------------------------------------------ MFU peak
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500), ("NVIDIA L40S", 362),
    ("AMD Instinct MI300X", 1307), ("AMD Instinct MI300X VF", 1307), ("NVIDIA GeForce RTX 4090", None),
])
def test_datasheet_peaks_by_device_name(name, tflops):
    assert gpu_peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_no_peak_on_cpu_unless_given():
    cpu = torch.device("cpu")
    assert peak_flops(cpu) is None
    assert peak_flops(cpu, 0.5) == 0.5e12
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        validate(compose(["logging.peak_tflops=-1"], run_dir="/tmp/x"), 1)


# ------------------------------------------------------------------------------- plain lines
def test_progress_line_and_eta():
    now = [100.0]
    eta = EtaClock(total_steps=10, clock=lambda: now[0])
    assert eta.update(2) is None  # the first record (compile, warm-up) only starts the clock
    now[0] += 4.0
    assert eta.update(4) == pytest.approx(2.0 * 6)  # 2 s per step, 6 steps left
    rec = {"kind": "train", "step": 4, "loss": 5.25, "lr": 1e-3, "tokens_per_s": 265_300.0, "mfu": 0.153,
           "mem_gib": 7.7, "step_time_s": 0.123, "grad_norm": 1.0}
    line = progress_line(rec, 300, 3 * 60 + 12)
    assert line == ("step=4/300 loss=5.2500 lr=1.00e-03 tok/s=265.3k mfu=15.3% mem=7.70GiB step_time=0.123s "
                    "eta=3m12s")
    assert progress_line({"kind": "val", "step": 40, "loss": 4.5}, 300) == "val step=40/300 loss=4.5"
    assert scalar_metrics(rec)["train/mfu"] == 0.153 and "train/step" not in scalar_metrics(rec)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream_cls, bar", [(io.StringIO, False), (_Terminal, True)])
def test_bar_only_on_a_terminal(tmp_path, stream_cls, bar):
    cfg = compose(["logging.wandb.mode=disabled"], run_dir=str(tmp_path))
    stream = stream_cls()
    sink = MetricsSink(cfg, str(tmp_path), True, 0, 4, stream=stream)
    assert (sink.bar is not None) == bar
    for step in (1, 2):
        sink.log({"kind": "train", "step": step, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 10.0, "mem_gib": 0.1})
    sink.close()
    text = stream.getvalue()
    if bar:
        assert "\r" in text  # tqdm redraws in place: fine on a terminal
    else:
        assert "\r" not in text
        assert text.splitlines()[0].startswith("step=1/4 loss=3.0000") and "eta=" in text.splitlines()[1]
    assert len(read_metrics(str(tmp_path))["train"]) == 2


# ------------------------------------------------------------------------------ end to end
def test_cluster_log_mfu_and_tensorboard_of_a_cpu_run(tmp_path):
    """A CPU run with stderr not a terminal (a SLURM .out): plain lines every log_every steps, no bar;
    MFU against the given peak only; TensorBoard event files with the scalars of metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY, "train.max_steps=4", "train.eval_every=4", "checkpoint.every=0", "checkpoint.save_final=false",
              "logging.progress_bar=true"]
    plain = run_cli([*common, f"run_dir={tmp_path / 'plain'}"])
    assert "\r" not in plain.stderr
    assert not any("mfu" in r for r in read_metrics(str(tmp_path / "plain"))["train"].values())  # CPU: no peak

    run = tmp_path / "tb"
    proc = run_cli([*common, f"run_dir={run}", "logging.peak_tflops=0.001", "logging.tensorboard=true",
                    "logging.log_every=2"])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("step=")]
    assert [ln.split()[0] for ln in lines] == ["step=2/4", "step=4/4"], proc.stderr[-2000:]
    assert "mfu=" in lines[0] and "tok/s=" in lines[0] and "mem=" in lines[0] and "eta=" in lines[1]
    assert "val step=4/4 loss=" in proc.stderr
    m = read_metrics(str(run))
    cfg = compose([*common, "logging.log_every=2"], run_dir=str(run))
    counts = parameter_counts(cfg.model, cfg.attention, cfg.moe)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len, counts["active"], counts["embedding"])
    for r in m["train"].values():
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 0.001e12, rel=1e-9)

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/mfu", "train/mem_gib", "val/loss"} <= tags
    for kind in ("train", "val"):
        for tag in (t for t in tags if t.startswith(kind + "/")):
            events = {e.step: e.value for e in acc.Scalars(tag)}
            want = {s: r[tag.split("/", 1)[1]] for s, r in m[kind].items()}
            assert events.keys() == want.keys(), tag
            assert all(events[s] == pytest.approx(v, rel=1e-6) for s, v in want.items()), tag


def test_tensorboard_missing_is_one_config_error(monkeypatch, tmp_path):
    from sparsetron.train.metrics import tensorboard_writer

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"logging.tensorboard: .*pip install tensorboard"):
        validate(compose(["logging.tensorboard=true"], run_dir=str(tmp_path)), 1)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tensorboard_writer(str(tmp_path))
