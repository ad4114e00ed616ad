"""The metrics window: the steps since the last flush, their scalars still on the device.

Each step hands the window its results (device tensors: mean loss, pre-clip gradient norm, updates skipped so
far); nothing waits for the device until a flush, which fetches every pending step's scalars in one host sync
(`fetch`). The window owns the logging cadence, `should_log(step)`: every train.log_interval steps (the loop
also flushes at a run's end, before a checkpoint and on a stop signal, minilm/train/loop.py).
"""

import time

import torch


class MetricsWindow:
    def __init__(self, log_interval: int, step: int):
        self.log_interval = log_interval
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.first_step = step  # the step before the window's first
        self.started = time.perf_counter()

    def add(self, result: tuple[torch.Tensor, ...]) -> None:
        self.pending.append(result)

    def should_log(self, step: int) -> bool:
        return step % self.log_interval == 0

    def fetch(self) -> list[list[float]]:
        """Every pending step's scalars, one row per step, in one host sync."""
        return torch.stack([torch.stack(result) for result in self.pending]).tolist()

    def elapsed(self) -> float:
        """Seconds since the window started."""
        return time.perf_counter() - self.started

    def restart(self, step: int) -> None:
        """An empty window after `step`."""
        self.pending, self.first_step, self.started = [], step, time.perf_counter()
