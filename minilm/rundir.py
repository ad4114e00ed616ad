"""The run-dir contract that training writes and analysis reads: file names and metrics.jsonl.

A run dir holds config.yaml (resolved), environment.json, metrics.jsonl (one JSON object per line,
each with `step`), summary.json, config revisions (REVISIONS_FILE) and checkpoints/. A W&B run keeps
the run dir's config and environment under the names below.
"""

import json
from pathlib import Path

CONFIG_FILE = "config.yaml"  # the resolved config
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REVISIONS_FILE = "config_revisions.yaml"  # config changes a resumed run accepted (minilm/train/lifecycle.py)
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = "run.lock"  # held for a run's life (minilm/train/lifecycle.py RunDirLock)
# What a run writes in its run dir; RUN_FOLDERS are the folders among them
RUN_FILES = (CONFIG_FILE, REVISIONS_FILE, METRICS_FILE, SUMMARY_FILE, ENVIRONMENT_FILE, CHECKPOINTS_DIR,
             "forensics", "wandb")
RUN_FOLDERS = (CHECKPOINTS_DIR, "forensics", "wandb")
# the run dir's config.yaml and environment.json, as stored inside the W&B run
WANDB_CONFIG_FILE = "minilm_config.yaml"
WANDB_ENVIRONMENT_FILE = "minilm_environment.json"
# The norm probe's row families, logged as diag/norm_error/<family>/<std>: rows mean + std * z. Centred
# rows test the dtype's range (fp16 goes subnormal below 6.1e-5), offset rows its spacing near 1 (the mean cancels).
PROBE_MEANS = {"centred": 0.0, "offset": 1.0}


def read_metrics(run_dir: Path, warn=None) -> list[dict]:
    """The rows of a run's metrics.jsonl. A line that is not a JSON row (a last line cut short by a crash)
    is left out, the others kept; `warn`, if given, is told of each one with its file and line number."""
    path, rows = Path(run_dir) / METRICS_FILE, []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if warn:
                    warn(f"{path} line {number} is not a whole JSON row (cut short?): left out, the other rows kept")
    return rows


def flatten(node: dict, prefix: str = "", keep_lists: bool = False) -> dict:
    """A nested config as {"dotted.key": value}; lists as their repr (hashable) unless keep_lists."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}.", keep_lists))
        elif isinstance(value, (str, int, float, bool, type(None))) or (keep_lists and isinstance(value, list)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = repr(value)
    return flat
