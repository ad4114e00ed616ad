"""The training loop, for one run or the N members of a batched ensemble.

    fit(stepper):
        each run gets its lap: where it ends, its metrics window, how it ends if nothing stops it
        runs that are at their end already end at once
        while runs train:
            one optimizer step of every run                          (stepper.step)
            each run: flush its metrics window when due, evaluate, checkpoint,
                      stop on a signal or a confirmed divergence       (after_step)
            runs that ended: final evaluation, sample, summary; they leave the stepper (end_laps)

A stepper steps its runs: `Alone` (one run, below) or `Ensemble` (runs batched into one
forward and backward, minilm/train/ensemble.py). One signal handler, one progress bar and one cadence
serve every run; what a run is between steps is minilm/train/run.py, its metrics window
minilm/train/metrics.py.
"""

import gc
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from minilm.train.lifecycle import RunDir, RunDirLock, StopSignals
from minilm.train.metrics import MetricsWindow
from minilm.train.run import Run

StepResult = tuple[torch.Tensor, ...] | None  # a step's device scalars, or None: the run stopped before it


class Stepper(Protocol):
    runs: list[Run]  # the runs still training, in the order `step` returns their results

    def step(self) -> list[StepResult]:
        """One optimizer step of every run (Run.train_step's result each)."""

    def samples(self, runs: list[Run]) -> list[str]:
        """The end-of-run samples of these runs."""

    def drop(self, runs: list[Run]) -> None:
        """These runs ended: they leave `runs`."""


class Alone:
    """The stepper of one run."""

    def __init__(self, run: Run):
        self.runs = [run]

    def step(self) -> list[StepResult]:
        return [self.runs[0].train_step()]

    def samples(self, runs: list[Run]) -> list[str]:
        return [run.sample() for run in runs]

    def drop(self, runs: list[Run]) -> None:
        self.runs = [run for run in self.runs if run not in runs]


@dataclass
class Lap:
    """A run's place in the loop."""

    run: Run
    end: int  # the step it trains to: train.max_steps, or fit's until_step
    window: MetricsWindow
    planned: str  # how it ends unless something stops it: "completed" at max_steps, else "paused"

    def running(self) -> bool:
        return self.run.step < self.end and not self.run.diverged_stop()


def fit(stepper: Stepper, until_step: int | None = None, progress: bool = True) -> list[dict]:
    """Train every run of `stepper` to train.max_steps (or only to `until_step`: outcome "paused", nothing
    written at the pause) and return their summaries, in order."""
    runs = list(stepper.runs)
    laps = {run: lap(run, until_step) for run in runs}
    for run in runs:
        run.model.train()
    signals = StopSignals()
    bar = tqdm(total=max(run.train_cfg.max_steps for run in runs), initial=min(run.step for run in runs),
               disable=not (progress and runs[0].is_main), dynamic_ncols=True, mininterval=1.0,
               desc="train" if len(runs) == 1 else f"ensemble of {len(runs)}")
    logging.captureWarnings(True)  # warnings go through logging, so they print above the progress bar
    try:
        with signals, logging_redirect_tqdm():
            end_laps(stepper, [lap for lap in laps.values() if not lap.running()], signals)
            while stepper.runs:
                results = stepper.step()
                ended = []
                for run, result in zip(stepper.runs, results):
                    with run.acting():
                        if after_step(laps[run], result, signals, bar.write) or not laps[run].running():
                            ended.append(laps[run])
                bar.update(1)
                if len(runs) == 1 and runs[0].logged_loss is not None:
                    bar.set_postfix(loss=f"{runs[0].logged_loss:.3f}", refresh=False)
                elif len(runs) > 1:
                    bar.set_postfix(members=len(stepper.runs) - len(ended), refresh=False)
                end_laps(stepper, ended, signals)
    finally:
        bar.close()
        logging.captureWarnings(False)
    return [run.summary for run in runs]


def lap(run: Run, until_step: int | None) -> Lap:
    max_steps = run.train_cfg.max_steps
    end = max_steps if until_step is None else min(until_step, max_steps)
    return Lap(run, end, MetricsWindow(run.train_cfg.log_interval, run.step),
               "completed" if end == max_steps else "paused")


def after_step(lap: Lap, result: StepResult, signals: StopSignals, write) -> bool:
    """A step's bookkeeping (flush, evaluate, checkpoint, stop signals); True when the run stops here."""
    run, window = lap.run, lap.window
    if result is not None:
        window.add(result)
    checkpoint_due = run.should_checkpoint()
    boundary = window.should_log(run.step) or run.step == lap.end or checkpoint_due
    stop = run.stop_agreed(signals.received is not None, boundary)
    if window.pending and (boundary or stop or result is None):
        run.log_window(window)
    if result is None or run.diverged_stop():
        return True
    if run.should_evaluate():
        run.evaluate_and_log(write)
    if checkpoint_due or stop:
        run.save_checkpoint()
    if stop:
        lap.planned = "interrupted"
    return stop


def end_laps(stepper: Stepper, laps: list[Lap], signals: StopSignals) -> None:
    """End these runs (final evaluation, sample, summary) and drop them from the stepper."""
    if not laps:
        return
    outcomes = {}
    for lap in laps:
        with lap.run.acting():
            if lap.window.pending:
                lap.run.log_window(lap.window)
            outcomes[lap.run] = lap.run.final_outcome(lap.planned)
    sampling = [lap.run for lap in laps if lap.run.samples_at_end(outcomes[lap.run])]
    texts = dict(zip(sampling, stepper.samples(sampling))) if sampling else {}
    for lap in laps:
        with lap.run.acting():
            lap.run.end(outcomes[lap.run], signals.name, texts.get(lap.run))
    stepper.drop([lap.run for lap in laps])


def train(cfg, run_dir: Path, overrides: list[str] = (), choices: dict | None = None) -> dict:
    """Train one run in `run_dir` and return its summary; a run that already finished there is not
    trained again (its summary is returned). Rank 0 holds the run dir's lock for the run's life."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with RunDirLock(run_dir, wait=cfg.train.wait_for_run_dir) if main_rank else nullcontext():
        return _train_locked(cfg, run_dir, overrides, choices)


def _train_locked(cfg, run_dir: Path, overrides: list[str], choices: dict | None) -> dict:
    finished = RunDir(run_dir).finished_summary(cfg)
    if finished is not None:
        return finished
    # A stop signal during data preparation, setup or the end of the run stops at once (exit 75); during
    # the steps, fit's own handlers stop after the step with a checkpoint.
    with StopSignals(at_once=True):
        run = Run(cfg, run_dir, overrides, choices)
        distributed = run.world_size > 1
        try:
            return fit(Alone(run))[0]
        except BaseException as error:
            run.fail(error)
            raise
        finally:
            run.close()
            # DDP's reducer holds the process group: destroying the group while the reducer is
            # alive makes its later destructor wait forever on gloo's threads.
            del run
            gc.collect()
            if distributed and dist.is_initialized():
                dist.destroy_process_group()
