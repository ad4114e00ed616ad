"""Shared test helpers: compose a config like train.py does and run small trainings.

Runs train at `size=test` (configs/size/test.yaml): a few seconds each on 2 CPU cores.
"""

import subprocess
import sys
from pathlib import Path

from minilm.launch.cli import compose
from minilm.rundir import read_metrics
from minilm.train.loop import Alone, fit, train
from minilm.train.run import Run

ROOT = Path(__file__).resolve().parent.parent


def with_tiny(overrides: list[str]) -> list[str]:
    """The test size, with the caller's overrides on top."""
    return ["size=test", *overrides]


def make_run(overrides: list[str], run_dir: Path) -> Run:
    """A Run at the test size, with no warmup (so the first steps already move the weights)."""
    return Run(compose(with_tiny(["optim.warmup_steps=0", *overrides])), Path(run_dir))


def fit_alone(run: Run, until_step: int | None = None) -> dict:
    """Train `run` alone through the one loop (minilm/train/loop.py fit); its summary."""
    return fit(Alone(run), until_step)[0]


def run_training(overrides: list[str], run_dir: Path) -> list[dict]:
    """Train at the test size + overrides in run_dir, as train.py does; return the metrics.jsonl rows."""
    train(compose(with_tiny(overrides)), Path(run_dir), overrides)
    return read_metrics(run_dir)


def losses(rows: list[dict]) -> list[float]:
    return [row["train/loss"] for row in rows if "train/loss" in row]


def peek_batch(trainer: Run):
    """The batch the next step will train on, leaving the sampler where it was."""
    state = dict(trainer.sampler.state_dict())
    batch = trainer.sampler.next_batch()
    trainer.sampler.load_state_dict(state)
    return batch


def load_script(name: str, folder: str):
    """A script of scripts/<folder>/ as a module, the way `python scripts/<folder>/<name>.py` sees its siblings."""
    import importlib

    sys.path.insert(0, str(ROOT / "scripts" / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts" / folder))


def train_command(overrides: list[str], run_dir: Path, launcher=(sys.executable,)) -> list[str]:
    return [*launcher, str(ROOT / "train.py"), *with_tiny(overrides), f"hydra.run.dir={run_dir}"]


def run_train_py(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """train.py in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
