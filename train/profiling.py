"""Opt-in torch.profiler window over training steps, for finding where a layout's step time goes.

    SPARSETRON_PROFILE=4:6 python -m sparsetron.train ...   # profiles steps 4 and 5 (0-based, end excluded)

Each rank writes <run dir>/profile/rank<R>.txt: the ops sorted by device time (CPU time without a
GPU), the table torch.profiler's key_averages prints."""

import os
from typing import Optional

import torch

ENV = "SPARSETRON_PROFILE"


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
    def __init__(self, window: Optional[tuple], run_dir: str, rank: int):
        self.window, self.path = window, os.path.join(run_dir, "profile", f"rank{rank}.txt")
        self._prof = None

    @classmethod
    def from_env(cls, run_dir: str, rank: int) -> "StepProfiler":
        return cls(parse_window(os.environ.get(ENV, "")), run_dir, rank)

    def at_step(self, step: int, last: bool = False) -> None:
        """Call before each step (and once after the loop with last=True)."""
        if self.window is None:
            return
        start, stop = self.window
        if self._prof is None and step == start and not last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        elif self._prof is not None and (step >= stop or last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                f.write(f"steps {start}..{min(step, stop) - 1}\n")
                f.write(self._prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
            self._prof, self.window = None, None
