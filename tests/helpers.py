"""Shared test helpers: compose a config like train.py does and run tiny trainings."""

from pathlib import Path

from minilm.cli import compose
from minilm.trainer import Trainer
from minilm.tracking import read_metrics

# A few seconds per run on 2 CPU cores: tiny model, a slice of the stdlib corpus.
TINY = ["model=tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=32",
        "train.batch_size=8", "train.eval_batches=2", "train.log_interval=1", "train.sample_tokens=0",
        "data.max_files=40", "data.vocab_size=512", "data.val_fraction=0.1", "logger=none"]


def with_tiny(overrides: list[str]) -> list[str]:
    """TINY, with any key the caller sets replaced by the caller's value."""
    merged = {o.split("=", 1)[0]: o for o in TINY}
    merged.update({o.split("=", 1)[0]: o for o in overrides})
    return list(merged.values())


def run_training(overrides: list[str], run_dir: Path) -> list[dict]:
    """Train with TINY + overrides in run_dir; return the metrics.jsonl rows."""
    Trainer(compose(with_tiny(overrides)), Path(run_dir)).fit()
    return read_metrics(run_dir)


def losses(rows: list[dict]) -> list[float]:
    return [row["train/loss"] for row in rows if "train/loss" in row]
