"""SPARSETRON_PROFILE (train/profiling.py): the op table, the Chrome/Perfetto trace (gzip) per rank,
named in the log; the CUDA memory snapshot is checked by the GPU run (no allocator history on a CPU)."""

import gzip
import json

import torch

from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.train.profiling import StepProfiler


def test_trace_covers_only_the_window_and_is_named(tmp_path, capsys):
    prof = StepProfiler((1, 3), str(tmp_path), rank=0)
    a = torch.randn(64, 64)
    for step in range(5):
        prof.at_step(step)
        (a @ a if step in (1, 2) else a + a).sum()
    prof.at_step(5, last=True)
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "rank0.trace.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names and "aten::add" not in names
    assert sum(e.get("name") == "aten::mm" for e in trace["traceEvents"]) == 2  # steps 1 and 2
    assert (tmp_path / "profile" / "rank0.txt").read_text().startswith("steps 1..2")
    assert not (tmp_path / "profile" / "rank0.memory.pickle").exists()  # CPU: no allocator snapshot
    out = capsys.readouterr().out
    assert "profile of steps 1..2" in out and "rank0.trace.json.gz" in out and "ui.perfetto.dev" in out


def test_other_ranks_write_but_do_not_announce(tmp_path, capsys):
    prof = StepProfiler((0, 1), str(tmp_path), rank=2)
    prof.at_step(0)
    torch.ones(8).sum()
    prof.at_step(1)
    assert (tmp_path / "profile" / "rank2.trace.json.gz").stat().st_size > 0
    assert "profile of steps" not in capsys.readouterr().out


def test_training_run_writes_the_trace(tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*TINY, f"run_dir={run}", "train.max_steps=3", "train.eval_every=0", "checkpoint.every=0",
                    "checkpoint.save_final=false"], env={"SPARSETRON_PROFILE": "1:2"})
    trace = json.loads(gzip.decompress((run / "profile" / "rank0.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    assert f"profile of steps 1..1 in {run / 'profile'}" in proc.stdout
