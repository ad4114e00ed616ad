"""Run tracking: the run dir's metrics.jsonl and summary.json, plus W&B (online, offline or off).

metrics.jsonl holds one JSON object per line, each with `step`. Opening it repairs it for the
run about to write: rows after the step the run continues from are dropped (the run
recomputes them), and so is a last line cut short by a crash, so a restart never duplicates,
glues or hides rows. summary.json is rewritten atomically and merged across resumes.

W&B by its own conventions: `logger.mode=auto` defers to WANDB_MODE and to `wandb offline` /
`wandb disabled` when they say offline or disabled; otherwise it logs online when
credentials are configured and the server answers within seconds, else offline. `disabled`
writes no W&B files at all. W&B failures never stop training: if it cannot start online it
falls back to offline with one warning, and if even that fails the run goes on with the
local files alone. The log says which mode ran and, for an offline run, how to sync it.

Metric names are slash-grouped and stable; see docs/diagnostics.md (Metrics).
"""

import contextlib
import json
import logging
import math
import netrc
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from minilm.errors import RunDirError
from minilm.rundir import METRICS_FILE, SUMMARY_FILE, read_metrics

WANDB_HOST = "api.wandb.ai"
REACHABILITY_TIMEOUT_S = 3.0
log = logging.getLogger("minilm")


def wandb_credentials_configured() -> bool:
    """True when W&B has an API key from the environment or ~/.netrc (never prompts)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return netrc.netrc().authenticators(_wandb_url().hostname or WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_url():
    return urlparse(os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}"))


def wandb_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    url = _wandb_url()
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str) -> tuple[str, str]:
    """(mode to run in, why) for logger.mode = auto | online | offline | disabled."""
    if requested != "auto":
        return requested, f"logger.mode={requested}"
    configured = os.environ.get("WANDB_MODE")
    if not configured:
        from wandb.sdk import wandb_setup

        # what `wandb offline` / `wandb disabled` saved, read from W&B's settings files now
        configured = wandb_setup.singleton().settings.read_system_settings().all().get("mode")
    if configured in ("offline", "dryrun", "disabled"):
        return ("offline" if configured == "dryrun" else configured), "WANDB_MODE / wandb settings"
    if not wandb_credentials_configured():
        return "offline", "no W&B credentials"
    if not wandb_reachable():
        return "offline", f"the W&B server {_wandb_url().hostname} did not answer within {REACHABILITY_TIMEOUT_S:g} s"
    return "online", "W&B credentials"


def run_naming(overrides: list[str], choices: dict | None = None) -> tuple[str, str, list[str]]:
    """(name, group, tags) of a run: its overrides sorted by key (so the order they were typed in does not
    matter), the group without the seed so seeds pool, a tag per override plus the study's name. A run
    without overrides is named after its main choices."""
    overrides = sorted((o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "logger."))),
                       key=lambda o: o.lstrip("+~").split("=", 1)[0])
    choices = choices or {}
    plain = "_".join(str(choices[g]) for g in ("model", "norm", "precision") if choices.get(g)) or "default"
    name = ",".join(overrides) or plain
    group = ",".join(o for o in overrides if not o.lstrip("+~").startswith("seed=")) or plain
    # W&B refuses a run with any tag over 64 characters; such an override stays in the name and group
    tags = [o for o in overrides if "=" in o and len(o) <= 64][:20]
    if choices.get("experiment"):
        tags.append(f"study:{choices['experiment']}")
    return name, group, tags


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable ("nan", "inf")
    return value


def repair_metrics(path: Path, keep_through_step: int) -> int:
    """Keep the rows of steps <= keep_through_step and drop the rest, a cut-off last line included.
    Returns the number of rows dropped. The file is replaced atomically."""
    if not path.exists():
        return 0
    rows = read_metrics(path.parent)
    kept = [row for row in rows if row["step"] <= keep_through_step]
    torn = not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0
    if len(kept) == len(rows) and not torn:
        return 0
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)
    return len(rows) - len(kept) + int(torn)


class Tracker:
    """metrics.jsonl + summary.json in the run dir, and the W&B run. `start_step`: the step the run
    continues from (0 for a fresh start); rows after it are dropped before anything is written."""

    def __init__(self, run_dir: Path, logger_cfg, config: dict, overrides: list[str], start_step: int = 0,
                 resume_id: str | None = None, choices: dict | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        dropped = repair_metrics(self.metrics_path, start_step)
        if dropped:
            log.info(f"metrics.jsonl: dropped {dropped} row(s) after step {start_step}, which this run recomputes")
        summary_path = self.run_dir / SUMMARY_FILE
        self._summary: dict = json.loads(summary_path.read_text()) if start_step and summary_path.exists() else {}
        # kept open for the run; line-buffered, so every row reaches the OS as it is logged
        self._metrics_file = open(self.metrics_path, "a", buffering=1)  # noqa: SIM115
        self.wandb_run, self.wandb_mode, self.wandb_location = None, "off", None
        if logger_cfg.backend == "wandb":
            self._start_wandb(logger_cfg, config, overrides, resume_id, choices)

    # ------------------------------------------------------------ W&B
    def _start_wandb(self, logger_cfg, config, overrides, resume_id, choices) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; logging to metrics.jsonl only (pip install wandb)")
            return
        mode, why = resolve_wandb_mode(str(logger_cfg.mode))
        if mode == "disabled":
            self.wandb_mode = "disabled"
            log.info(f"W&B disabled ({why}); metrics go to {self.metrics_path} only")
            return
        name, group, tags = run_naming(overrides, choices)
        run_id = logger_cfg.run_id or resume_id
        kwargs = dict(
            project=logger_cfg.project, entity=logger_cfg.entity, name=logger_cfg.name or name,
            group=logger_cfg.group or group, tags=list(logger_cfg.tags) + tags,
            config=config, dir=str(self.run_dir), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", init_timeout=30, silent=True),
            # a run of its own even while another is active in this process (the members of an ensemble)
            reinit="create_new",
        )
        try:
            self.wandb_run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            if mode == "offline":
                log.warning(f"W&B could not start ({type(err).__name__}: {err}); logging to metrics.jsonl only")
                return
            log.warning(f"W&B could not start online ({type(err).__name__}: {err}); falling back to offline")
            try:
                self.wandb_run, mode, why = wandb.init(mode="offline", **kwargs), "offline", "online start failed"
            except Exception as err2:  # noqa: BLE001
                log.warning(f"W&B offline also failed ({type(err2).__name__}); logging to metrics.jsonl only")
                return
        self.wandb_mode = mode
        # where to find the run afterwards: its URL when online, the sync command when offline
        run_dir = Path(self.wandb_run.dir).parent
        self.wandb_location = (f"W&B offline run: wandb sync {run_dir}" if mode == "offline"
                               else f"W&B run: {getattr(self.wandb_run, 'url', None) or run_dir}")
        log.info(f"W&B run {self.wandb_run.id} logs {mode} ({why}); {self.wandb_location}")

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
            log.warning(f"W&B call failed ({type(err).__name__}: {err}); continuing with local files only")
            self.wandb_run = None

    # ------------------------------------------------------------ metrics
    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            self._metrics_file.write(json.dumps(row) + "\n")
        except OSError as error:  # a full disk, a quota: the rows since the last checkpoint are trained again
            with contextlib.suppress(OSError):
                self._metrics_file.close()  # drops the unwritten rest of the line; a resume drops a cut line
            raise RunDirError(f"could not write {self.metrics_path} ({error.strerror or error}); free some space "
                              f"and run the same command again to resume from the last checkpoint") from None
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step))

    def summary(self, values: dict) -> None:
        """Merge into the run summary (W&B summary and summary.json), written at once."""
        self._summary.update({k: _jsonable(v) for k, v in values.items()})
        tmp = self.run_dir / "summary.json.tmp"
        try:
            tmp.write_text(json.dumps(self._summary, indent=1))
            os.replace(tmp, self.run_dir / SUMMARY_FILE)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the metrics file and finish the W&B run; safe to call twice."""
        if not self._metrics_file.closed:
            self._metrics_file.close()
        if self.wandb_run:
            self._guard(lambda: self.wandb_run.finish(exit_code=exit_code))
            self.wandb_run = None
