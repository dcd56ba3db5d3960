import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparsetron.configs.schema import DataConfig
from sparsetron.parallel.runtime import Runtime
from sparsetron.train.data import DataError, ResumableSampler, build_data
from sparsetron.train.data.corpus import list_documents, split


def _cfg(tmp_path, **data):
    return OmegaConf.create({
        "data": {**OmegaConf.to_container(OmegaConf.structured(DataConfig)), "cache_dir": str(tmp_path / "cache"),
                 **data},
        "train": {"seq_len": 32},
        "model": {"vocab_size": 300},
    })


def test_sampler_splits_are_the_same_samples():
    one = ResumableSampler(1000, 16, 4, 0, 1, seed=3)  # 1 rank, 4 accumulation steps
    two = [ResumableSampler(1000, 16, 4, r, 2, seed=3) for r in range(2)]  # 2 ranks, 2 steps each
    for step in range(70):  # crosses an epoch boundary (62 steps per epoch)
        single = sorted(sum(one.indices(step), []))
        split_ = sorted(sum(two[0].indices(step), []) + sum(two[1].indices(step), []))
        assert single == split_ and len(set(single)) == 16


def test_sampler_epochs_differ_and_cover():
    s = ResumableSampler(64, 16, 16, 0, 1, seed=0)
    e0 = sorted(sum((s.indices(i)[0] for i in range(4)), []))
    assert e0 == list(range(64))
    assert s.indices(0) != s.indices(4)


def test_sampler_resumes_at_the_right_sample():
    a = ResumableSampler(500, 8, 2, 1, 2, seed=7)
    seen = [a.next_step() for _ in range(10)]
    b = ResumableSampler(500, 8, 2, 1, 2, seed=7)
    b.load_state_dict(ResumableSampler(500, 8, 2, 1, 2, seed=7).state_dict() | {"consumed_samples": 5 * 8})
    assert [b.next_step() for _ in range(5)] == seen[5:]
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict({"consumed_samples": 0, "seed": 8, "num_samples": 500})


def test_stdlib_corpus_split_is_deterministic(tmp_path):
    cfg = _cfg(tmp_path, max_corpus_bytes=300_000)
    docs = list_documents(cfg.data)
    train, val = split(docs, 0.05)
    assert docs == list_documents(cfg.data) and train and val and not set(train) & set(val)


def test_text_and_jsonl_user_data(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"document number {i} says hello world " * 5}) + "\n")
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")], val_fraction=0.2)
    data = build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert (tmp_path / "run" / "tokenizer.json").exists()  # saved beside the run
    assert len(data.train) > 0 and len(data.val) > 0 and data.vocab_size <= 300
    x, y = data.train.batch([0, 1])
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_jsonl_missing_field_names_the_file(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": "x" * 50}) for _ in range(40)))
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "c.jsonl")], val_fraction=0.3)
    with pytest.raises(DataError, match=r"c.jsonl:\d+: .*data.jsonl_field"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))


def test_memmap_shards(tmp_path):
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 5000, dtype=np.uint16).tofile(tmp_path / "train_0.bin")
    rng.integers(0, 300, 3000, dtype=np.uint16).tofile(tmp_path / "train_1.bin")
    rng.integers(0, 300, 1000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "train_*.bin")], val_paths=[str(tmp_path / "val.bin")])
    data = build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert len(data.train) == (8000 - 1) // 32 and len(data.val) == (1000 - 1) // 32
    flat = np.concatenate([np.fromfile(tmp_path / f"train_{i}.bin", dtype=np.uint16) for i in (0, 1)])
    x, y = data.train.batch([156, 0])  # window 156 spans the boundary of the two shards (token 5000)
    assert np.array_equal(x[0].numpy(), flat[156 * 32 : 157 * 32]) and np.array_equal(y[1].numpy(), flat[1:33])
    # no val_paths: the tail is held out, lazily
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "train_*.bin")], val_fraction=0.25)
    held = build_data(cfg, Runtime(), str(tmp_path / "run_tail"))
    assert len(held.train) == (6000 - 1) // 32 and len(held.val) == (2000 - 1) // 32
    assert np.array_equal(held.val.batch([0])[0][0].numpy(), flat[6000:6032])
    # a uint32 shard read as uint16 shows token ids beyond the vocabulary: caught, with the field named
    rng.integers(70000, 80000, 4000, dtype=np.uint32).tofile(tmp_path / "big.bin")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "big.bin")], memmap_dtype="uint32")
    with pytest.raises(DataError, match="model.vocab_size"):
        build_data(cfg, Runtime(), str(tmp_path / "run2"))


def test_tokenizer_smaller_than_model_vocab_required(tmp_path):
    cfg = _cfg(tmp_path, max_corpus_bytes=200_000)
    build_data(cfg, Runtime(), str(tmp_path / "run"))
    cfg.model.vocab_size = 100
    with pytest.raises(DataError, match="model.vocab_size=100"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))
