"""Opt-in torch.profiler window over training steps, for finding where a layout's step time goes.

    SPARSETRON_PROFILE=4:6 python -m sparsetron.train ...   # profiles steps 4 and 5 (0-based, end excluded)

Each rank R writes into <run dir>/profile/:
- rankR.txt            the ops sorted by device time (CPU time without a GPU), key_averages' table;
- rankR.trace.json.gz  the Chrome/Perfetto trace: CPU ops, CUDA kernels and streams on one timeline
                       (overlap of compute and communication, stalls); open it in https://ui.perfetto.dev
                       (or chrome://tracing) as it is, gzip included;
- rankR.memory.pickle  on CUDA, the allocator's memory snapshot over the window (every allocation with its
                       Python stack); drag it onto https://pytorch.org/memory_viz.
Rank 0 names the files in the log when the window closes."""

import os
from typing import List, Optional

import torch

ENV = "SPARSETRON_PROFILE"
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept for the snapshot (ring buffer)


def parse_window(text: str) -> Optional[tuple]:
    if not text:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        start, stop = -1, -1
    if not 0 <= start < stop:
        raise ValueError(f"{ENV}={text!r}: expected START:STOP step numbers with 0 <= START < STOP, e.g. 4:6")
    return start, stop


class StepProfiler:
    def __init__(self, window: Optional[tuple], run_dir: str, rank: int, announce: Optional[bool] = None):
        self.window, self.rank = window, rank
        self.dir = os.path.join(run_dir, "profile")
        self.path = os.path.join(self.dir, f"rank{rank}.txt")
        self.trace_path = os.path.join(self.dir, f"rank{rank}.trace.json.gz")
        self.memory_path = os.path.join(self.dir, f"rank{rank}.memory.pickle")
        self.announce = rank == 0 if announce is None else announce
        self._prof = None
        self._memory = False

    @classmethod
    def from_env(cls, run_dir: str, rank: int) -> "StepProfiler":
        return cls(parse_window(os.environ.get(ENV, "")), run_dir, rank)

    def at_step(self, step: int, last: bool = False) -> None:
        """Call before each step (and once after the loop with last=True)."""
        if self.window is None:
            return
        start, stop = self.window
        if self._prof is None and step == start and not last:
            self._start()
        elif self._prof is not None and (step >= stop or last):
            self._stop(start, min(step, stop) - 1)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        cuda = torch.cuda.is_available()
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            # the allocator records from here on; the snapshot then holds the window's allocations
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self._memory = True
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()

    def _stop(self, first: int, last: int) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        written: List[str] = [self.path, self.trace_path]
        if self._memory:
            torch.cuda.memory._dump_snapshot(self.memory_path)
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(self.memory_path)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        with open(self.path, "w") as f:
            f.write(f"steps {first}..{last}\n")
            f.write(self._prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
        self._prof.export_chrome_trace(self.trace_path)  # ".gz": torch writes it gzipped
        viewers = "trace: https://ui.perfetto.dev" + (", memory: https://pytorch.org/memory_viz" if self._memory else "")
        self._prof, self._memory, self.window = None, False, None
        self.written = written
        if self.announce:
            names = ", ".join(os.path.basename(p) for p in written)
            print(f"sparsetron: profile of steps {first}..{last} in {self.dir}: {names} (one set per rank; {viewers})",
                  flush=True)
