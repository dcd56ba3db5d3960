"""Batches for a step, prepared ahead on a background thread so the device never waits on the host
(pinned host memory + non-blocking copies on GPU)."""

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Tuple

import torch

Batch = Tuple[torch.Tensor, torch.Tensor]


class Prefetcher:
    def __init__(self, make_step: Callable[[int], List[Batch]], device: torch.device, depth: int):
        self.make_step = make_step
        self.device = device
        self.depth = max(depth, 0)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if self.depth else None
        self.pending: deque = deque()
        self.next_to_submit = None

    def _prepare(self, step: int) -> List[Batch]:
        batches = self.make_step(step)
        if self.device.type == "cuda":
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
        return batches

    def get(self, step: int) -> List[Batch]:
        """The micro-batches of `step` on the device; queues the following steps."""
        if self.pool is None:
            batches = self._prepare(step)
        else:
            if not self.pending or self.pending[0][0] != step:  # first call, or a jump (resume)
                self.pending.clear()
                self.next_to_submit = step
            while len(self.pending) < self.depth + 1:
                s = self.next_to_submit
                self.pending.append((s, self.pool.submit(self._prepare, s)))
                self.next_to_submit += 1
            batches = self.pending.popleft()[1].result()
        nb = self.device.type == "cuda"
        return [(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)) for x, y in batches]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
