import os

import pytest
import torch

from sparsetron.train import checkpoint as ckpt


def _files(value: float):
    return {"model.safetensors": {"w": torch.full((4, 4), value)}, "optimizer.pt": {"state": {}, "lr": value},
            "trainer_state.json": {"step": int(value)}}


def test_save_is_atomic_and_latest_is_complete(tmp_path):
    root = str(tmp_path)
    ckpt.save(root, 1, _files(1.0), keep_last=3)
    real_write = ckpt.write_files

    def crash_midway(directory, files):  # the model lands, then the process "dies"
        real_write(directory, dict(list(files.items())[:1]))
        raise KeyboardInterrupt("injected crash while writing")

    ckpt.write_files = crash_midway
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(root, 2, _files(2.0), keep_last=3)
    finally:
        ckpt.write_files = real_write
    latest = ckpt.latest(root)
    assert latest.endswith("step_00000001")
    assert torch.equal(ckpt.read_tensors(latest, "model.safetensors")["w"], torch.full((4, 4), 1.0))
    assert ckpt.read_json(latest, "trainer_state.json") == {"step": 1}


def test_a_killed_writer_leaves_no_complete_checkpoint(tmp_path):
    """A temp dir (what kill -9 leaves) and a step dir without its marker are both ignored."""
    ckpt.save(str(tmp_path), 5, _files(5.0), keep_last=3)
    os.makedirs(tmp_path / ".tmp-step_00000006-deadbeef")
    os.makedirs(tmp_path / "step_00000007")
    assert ckpt.latest(str(tmp_path)).endswith("step_00000005")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.check_complete(str(tmp_path / "step_00000007"))
    ckpt.save(str(tmp_path), 8, _files(8.0), keep_last=1)  # pruning also clears crashed temp dirs
    assert sorted(os.listdir(tmp_path)) == ["step_00000007", "step_00000008"]


def test_keep_last(tmp_path):
    for s in range(1, 6):
        ckpt.save(str(tmp_path), s, _files(float(s)), keep_last=2)
    assert [os.path.basename(p) for p in ckpt.list_complete(str(tmp_path))] == ["step_00000004", "step_00000005"]


def test_corrupt_files_are_named(tmp_path):
    path = ckpt.save(str(tmp_path), 3, _files(3.0), keep_last=2)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.read_tensors(path, "model.safetensors")
    with open(os.path.join(path, "optimizer.pt"), "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.read_torch(path, "optimizer.pt")


def test_loading_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = ckpt.save(str(tmp_path), 1, {"optimizer.pt": {"x": Evil()}}, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.read_torch(path, "optimizer.pt")


def test_model_config_mismatch_names_the_field(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="model.dim=128.*model.dim=64"):
        ckpt.check_model_config(str(tmp_path), {"dim": 128}, {"dim": 64})
