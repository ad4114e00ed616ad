"""Run tracking: W&B (online, offline or off) plus local files in the run dir.

The run dir always gets `metrics.jsonl` (one JSON object per line, each with
`step`) and `summary.json`, whatever happens to W&B. W&B failures never stop
training: if it cannot start online we fall back to offline with one warning,
and if even that fails we carry on with the local files alone.

Metric names are slash-grouped and stable; see METRICS in README.md.
"""

import json
import math
import netrc
import os
import shutil
import warnings
from pathlib import Path
from urllib.parse import urlparse

WANDB_HOST = "api.wandb.ai"
# the run dir's config.yaml and environment.json, as stored inside the W&B run
WANDB_CONFIG_FILE = "minilm_config.yaml"
WANDB_ENVIRONMENT_FILE = "minilm_environment.json"


def wandb_credentials_configured() -> bool:
    """True when W&B has an API key from the environment or ~/.netrc (never prompts)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}")).hostname or WANDB_HOST
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_naming(overrides: list[str]) -> tuple[str, str]:
    """(name, group) from the command-line overrides: the group leaves out the seed so seeds pool."""
    overrides = [o for o in overrides if not o.startswith(("hydra.", "logger."))]
    name = ",".join(overrides) or "default"
    group = ",".join(o for o in overrides if not o.lstrip("+~").startswith("seed=")) or "default"
    return name, group


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable ("nan", "inf")
    return value


class Tracker:
    def __init__(self, run_dir: Path, logger_cfg, config: dict, overrides: list[str],
                 resume_id: str | None = None, log=print, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.log_message = log
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.metrics_path.exists():
            self._drop_rows_after(resume_step)
        self._summary: dict = {}
        if resume_step is not None and (self.run_dir / "summary.json").exists():
            self._summary = json.loads((self.run_dir / "summary.json").read_text())  # merged, not lost
        self._metrics_file = open(self.metrics_path, "a", buffering=1)
        self.wandb_run = None
        if logger_cfg.backend == "wandb":
            self._start_wandb(logger_cfg, config, overrides, resume_id)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run recomputes the steps after its checkpoint: drop their old rows so each step appears once."""
        kept = [row for row in read_metrics(self.run_dir) if row["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.metrics_path)

    # ------------------------------------------------------------ W&B
    def _start_wandb(self, logger_cfg, config, overrides, resume_id) -> None:
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed; logging to metrics.jsonl only (pip install wandb)")
            return
        name, group = run_naming(overrides)
        mode = logger_cfg.mode
        if mode == "auto":
            mode = "online" if wandb_credentials_configured() else "offline"
        kwargs = dict(
            project=logger_cfg.project, entity=logger_cfg.entity, name=logger_cfg.name or name,
            group=logger_cfg.group or group,
            # W&B refuses a run with any tag over 64 characters; such an override stays in the name and group
            tags=list(logger_cfg.tags) + [o for o in overrides if "=" in o and len(o) <= 64][:20],
            config=config, dir=str(self.run_dir), id=resume_id, resume="allow" if resume_id else None,
            settings=wandb.Settings(console="off", init_timeout=60, silent=True),
        )
        try:
            self.wandb_run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            if mode == "offline":
                warnings.warn(f"W&B could not start ({type(err).__name__}: {err}); logging to metrics.jsonl only")
                return
            warnings.warn(f"W&B could not start online ({type(err).__name__}: {err}); falling back to offline")
            try:
                self.wandb_run = wandb.init(mode="offline", **kwargs)
            except Exception as err2:  # noqa: BLE001
                warnings.warn(f"W&B offline also failed ({type(err2).__name__}); logging to metrics.jsonl only")
                return
        self.log_message(f"W&B run {self.wandb_run.id} ({mode}) in {self.wandb_run.dir}")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run else None

    def save_file(self, path: Path, name: str) -> None:
        """Keep a copy of a run-dir file inside the W&B run as `name` (fetchable later through the API).

        Names must not clash with W&B's own files (its `config.yaml` holds run.config in its format).
        """
        if self.wandb_run:
            def save():
                copy = Path(self.wandb_run.dir) / name
                shutil.copyfile(path, copy)
                self.wandb_run.save(str(copy), base_path=self.wandb_run.dir, policy="now")
            self._guard(save)

    def _guard(self, action) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B call failed ({type(err).__name__}: {err}); continuing with local files only")
            self.wandb_run = None

    # ------------------------------------------------------------ metrics
    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step))

    def summary(self, values: dict) -> None:
        """Merge into the run summary (W&B summary and summary.json), written at once."""
        self._summary.update({k: _jsonable(v) for k, v in values.items()})
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(self._summary, indent=1))
        os.replace(tmp, self.run_dir / "summary.json")
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        self._metrics_file.close()
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.finish(exit_code=exit_code))
            self.wandb_run = None


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, tolerating a last line cut short by a crash."""
    rows = []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
