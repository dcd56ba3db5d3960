import pytest
import torch

from sparsetron.train.profiling import StepProfiler, parse_window


def test_window_parsing():
    assert parse_window("") is None
    assert parse_window("4:6") == (4, 6)
    for bad in ("6:4", "x", "3", "-1:2", "2:2"):
        with pytest.raises(ValueError, match="SPARSETRON_PROFILE"):
            parse_window(bad)


def test_profiles_only_the_window(tmp_path):
    prof = StepProfiler((1, 2), str(tmp_path), rank=3)
    a = torch.randn(64, 64)
    for step in range(4):
        prof.at_step(step)
        (a @ a if step == 1 else a + a).sum()
    prof.at_step(4, last=True)
    text = (tmp_path / "profile" / "rank3.txt").read_text()
    assert text.startswith("steps 1..1") and "aten::mm" in text and "aten::add" not in text
