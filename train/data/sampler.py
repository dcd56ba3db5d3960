"""Deterministic, resumable, rank-aware sample order.

The state is one integer, `consumed_samples` (Megatron's habit): global step b uses samples
perm_e[b*G : (b+1)*G] of epoch e's permutation, where G is the global batch. Rank r's
accumulation step a takes the slice starting at (a*dp + r)*micro. So any (dp, micro, accumulation)
split of the same global batch sees the same samples, and resuming needs only the counter.

An index carries its epoch: epoch e's indices are e*num_samples + perm_e[...]. A plain dataset takes
them modulo its length; a blended one (blend.py) uses the epoch to walk on through a down-weighted
source instead of drawing the same subset every epoch."""

from typing import List

import torch


class ResumableSampler:
    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} not divisible by micro {micro_batch} x dp {dp_size}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch}); "
                             f"use more data or a smaller train.global_batch_size / train.seq_len")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = 0
        self.steps_per_epoch = num_samples // global_batch  # the ragged tail of an epoch is skipped
        self._perm = None  # (epoch, permutation)

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        cached = self._perm
        if cached is None or cached[0] != epoch:  # a tuple swap: safe when a prefetch thread calls too
            g = torch.Generator().manual_seed(self.seed + epoch)
            cached = (epoch, torch.randperm(self.num_samples, generator=g))
            self._perm = cached
        return cached[1]

    def indices(self, step: int) -> List[List[int]]:
        """This rank's micro-batches (sample indices) for optimizer step `step` (a pure function)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start, base = b * self.global_batch, epoch * self.num_samples
        micro = []
        for a in range(self.accumulation_steps):
            offset = start + (a * self.dp_size + self.dp_rank) * self.micro_batch
            micro.append((perm[offset : offset + self.micro_batch] + base).tolist())
        return micro

    def next_step(self) -> List[List[int]]:
        """The micro-batches of the next step; advances consumed_samples."""
        micro = self.indices(self.consumed_samples // self.global_batch)
        self.consumed_samples += self.global_batch
        return micro

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples / seed {state['seed']}, this run has "
                f"{self.num_samples} / {self.seed}: the data or train.seed/seq_len changed since the checkpoint"
            )
        self.consumed_samples = state["consumed_samples"]
