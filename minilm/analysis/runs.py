"""What finished runs left behind, read back as one record type: the input of reproduce and report.

A source is one of
    run dir       a Hydra run dir: config.yaml (resolved), environment.json, metrics.jsonl, summary.json
    W&B run dir   <run dir>/wandb/offline-run-*/ or run-*/: its files/ hold the run dir's config and
                  environment (rundir.WANDB_*_FILE); its history is read from the run dir around it
    W&B run path  entity/project/run_id (or a project's runs, filtered by group), through the W&B API

Every W&B API call goes through `wandb_api()`, the one seam tests replace.
"""

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minilm.errors import SourceError
from minilm.rundir import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    METRICS_FILE,
    REVISIONS_FILE,
    SUMMARY_FILE,
    WANDB_CONFIG_FILE,
    WANDB_ENVIRONMENT_FILE,
    read_metrics,
)

log = logging.getLogger("minilm")


@dataclass
class RunRecord:
    name: str                         # the run dir, or the W&B run path
    config: dict                      # the resolved config the run trained with
    environment: dict = field(default_factory=dict)  # environment.json ({} when not recorded)
    rows: list[dict] | None = None    # metrics rows ({"step": ..., name: value}); None when not available
    summary: dict = field(default_factory=dict)
    revisions: list[dict] = field(default_factory=list)  # [{"step": s, "changes": {key: {"from", "to"}}}]

    def series(self, metric: str) -> dict[int, float]:
        """{step: value} of one metric; non-finite values (logged as "nan", "inf") become floats."""
        return {row["step"]: float(row[metric]) for row in self.rows or () if row.get(metric) is not None}


def _parsed(path: Path, kind: type, default):
    """A YAML / JSON file of the expected kind, `default` when absent; a broken one is a SourceError."""
    if not path.exists():
        return default
    try:
        value = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError) as error:
        raise SourceError(f"{path} is unreadable ({type(error).__name__}); restore it from the W&B run or a "
                          f"backup") from None
    if not isinstance(value, kind):
        raise SourceError(f"{path} is {'empty' if value is None else 'not a ' + kind.__name__}; restore it from "
                          f"the W&B run or a backup")
    return value


def _json(path: Path) -> dict:
    return _parsed(path, dict, {})


def load_run_dir(path: Path) -> RunRecord:
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise SourceError(f"{path} is not a run dir: it has no config.yaml")
    rows = read_metrics(path, warn=log.warning) if (path / METRICS_FILE).exists() else None
    return RunRecord(str(path), _parsed(path / CONFIG_FILE, dict, None), _json(path / ENVIRONMENT_FILE), rows,
                     _json(path / SUMMARY_FILE), _parsed(path / REVISIONS_FILE, list, []))


def load_wandb_run_dir(path: Path) -> RunRecord:
    """A local W&B run dir, offline or synced. Its losses come from the run dir it sits in, if any."""
    path = Path(path).resolve()
    files = path / "files"
    if not (files / WANDB_CONFIG_FILE).exists():
        raise SourceError(f"{path} is not a W&B run dir of this project: it has no files/{WANDB_CONFIG_FILE}")
    run_dir = path.parent.parent  # <run dir>/wandb/<this>
    has_rows = path.parent.name == "wandb" and (run_dir / METRICS_FILE).exists()
    rows = read_metrics(run_dir, warn=log.warning) if has_rows else None
    summary = _json(run_dir / SUMMARY_FILE) if rows is not None else _json(files / "wandb-summary.json")
    return RunRecord(str(path), _parsed(files / WANDB_CONFIG_FILE, dict, None), _json(files / WANDB_ENVIRONMENT_FILE),
                     rows, summary)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run dir under `root` (itself included), in path order; W&B's own dirs are skipped."""
    root = Path(root)
    found = [p.parent for p in root.rglob(METRICS_FILE) if "wandb" not in p.relative_to(root).parts]
    return sorted(p for p in found if (p / CONFIG_FILE).exists())


# ---------------------------------------------------------------- W&B API


def wandb_api():
    """The W&B public API client (needs network and credentials); tests replace this function."""
    import wandb

    return wandb.Api()


def is_wandb_path(source: str, parts: int) -> bool:
    """Whether `source` reads as a W&B path of `parts` components (entity/project[/run_id]), not a local path."""
    pieces = source.split("/")
    return not Path(source).exists() and len(pieces) == parts and all(pieces)


def _download(run, name: str):
    """A file saved in the W&B run, parsed (YAML or JSON), or None if the run has no such file."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run.file(name).download(root=tmp, replace=True)
            text = (Path(tmp) / name).read_text()
        except Exception:  # noqa: BLE001 - W&B raises several types for a missing file
            return None
    return yaml.safe_load(text)  # JSON is YAML


def _history_rows(run) -> list[dict]:
    rows = []
    for entry in run.scan_history():
        row = {"step": int(entry["_step"])}
        for key, value in entry.items():
            if key.startswith("_") or value is None:
                continue
            row[key] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
        rows.append(row)
    return rows


def load_wandb_run(run) -> RunRecord:
    """A W&B API run: the resolved config the tracker saved (W&B's run.config if it is missing)."""
    config = _download(run, WANDB_CONFIG_FILE) or dict(run.config)
    environment = _download(run, WANDB_ENVIRONMENT_FILE) or {}
    return RunRecord("/".join(run.path), config, environment, _history_rows(run), dict(run.summary))


def fetch_wandb_run(path: str) -> RunRecord:
    return load_wandb_run(wandb_api().run(path))


def fetch_wandb_runs(project: str, group: str | None = None) -> list[RunRecord]:
    """The runs of entity/project, or those whose W&B group matches the regular expression `group`."""
    filters = {"group": {"$regex": group}} if group else {}
    return [load_wandb_run(run) for run in wandb_api().runs(project, filters=filters)]


# ---------------------------------------------------------------- one source


def load_run(source: str) -> RunRecord:
    """One run from a run dir, a local W&B run dir or a W&B run path entity/project/run_id."""
    path = Path(source)
    if (path / CONFIG_FILE).exists():
        return load_run_dir(path)
    if (path / "files").is_dir():
        return load_wandb_run_dir(path)
    if is_wandb_path(source, 3):
        return fetch_wandb_run(source)
    raise SourceError(f"{source!r} is neither a run dir (with config.yaml), a W&B run dir (with files/) "
                      f"nor a W&B run path entity/project/run_id")
