"""The pieces of a run's life around the training step, each with its own state and cadence.

    RunDirLock    one run per run dir: held for the run's life, a second process is refused (or waits).
    RunDir        what a run dir already holds (a logged config, a finished run's summary, a W&B
                  id), checked before anything is trained: a finished run is not trained again, a
                  resume whose config changes the math is refused (or recorded as a revision when
                  asked for), and a forced restart archives the old files instead of deleting them.
    StepScalars   each step's loss and gradient norm on the host, one step late, without draining
                  the device queue: what divergence detection and forensics read.
    StopSignals   SIGINT / SIGTERM / SIGUSR1 ask the run to stop after its step (checkpoint,
                  summary, W&B finished); a second SIGINT stops it at once, and so does any of them
                  outside the training steps (data preparation, setup, the end of the run), where
                  there is no step to finish: `Interrupted`, which the entry point ends with exit 75.
"""

import contextlib
import copy
import fcntl
import json
import logging
import os
import signal
import socket
from datetime import datetime
from enum import Enum
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from minilm.config import default_of, schema_field
from minilm.errors import ConfigError, RunDirError
from minilm.rundir import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    LOCK_FILE,
    REVISIONS_FILE,
    RUN_FILES,
    RUN_FOLDERS,
    SUMMARY_FILE,
    flatten,
)

log = logging.getLogger("minilm")
FINISHED = ("completed", "diverged")
# Keys that change what is logged, where and how often, or how fast, but not the math of training:
# a resumed run may change them freely.
BOOKKEEPING_PREFIXES = ("logger.", "diagnostics.", "paths.", "study.")
BOOKKEEPING_KEYS = {
    "train.log_interval", "train.eval_interval", "train.eval_batches", "train.ckpt_interval", "train.resume",
    "train.allow_config_change", "train.wait_for_run_dir", "train.sample_tokens", "train.compile",
    "train.compile_backend", "train.compile_mode", "train.stop_on_divergence", "train.divergence_margin",
    "train.divergence_window", "device", "detect_anomaly", "data.num_proc",
}


def logged_default(key: str):
    """What a config logged before `key` existed meant by it: the schema's default (a new key's default
    keeps the earlier behaviour), as config.yaml would hold it."""
    f = schema_field(key)
    if f is None:
        return "<absent>"
    value = default_of(f)
    return value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value


def plain(cfg) -> dict:
    """A config as plain containers, enums as strings: what config.yaml and checkpoints hold."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg


def math_changes(logged: dict, current: dict) -> dict[str, tuple]:
    """{key: (logged value, current value)} for every key that differs and changes the math of training."""
    old, new = flatten(plain(logged), keep_lists=True), flatten(plain(current), keep_lists=True)
    old = {**{key: logged_default(key) for key in new.keys() - old.keys()}, **old}
    new = {**{key: logged_default(key) for key in old.keys() - new.keys()}, **new}
    return {key: (old.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(old.keys() | new.keys())
            if key not in BOOKKEEPING_KEYS and not key.startswith(BOOKKEEPING_PREFIXES)
            and old.get(key, "<absent>") != new.get(key, "<absent>")}


def describe(changes: dict[str, tuple], limit: int = 6) -> str:
    shown = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in list(changes.items())[:limit]]
    return ", ".join(shown) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def apply_revisions(config: dict, revisions: list[dict], until_step: int | None = None) -> dict:
    """The config in effect after the revisions that took effect at or before `until_step` (all if None)."""
    config = copy.deepcopy(config)
    for revision in revisions:
        if until_step is not None and revision["step"] > until_step:
            continue
        for key, change in revision["changes"].items():
            *parents, last = key.split(".")
            node = config
            for parent in parents:
                node = node.setdefault(parent, {})
            node[last] = change["to"]
    return config


def check_resume(logged: dict, cfg, step: int, allow: bool) -> dict[str, tuple]:
    """Refuse to continue a run whose math would change, unless allowed; returns the changes."""
    changes = math_changes(logged, cfg)
    if changes and not allow:
        raise ConfigError(f"resuming at step {step} with a config that changes the math: {describe(changes)}; "
                          f"rerun with the logged values, pass train.allow_config_change=true to continue "
                          f"with the change recorded, or use another hydra.run.dir")
    return changes


def _make_run_dir(path: Path) -> None:
    """Create the run dir; refuse in one line one that is a file, not writable, or holds a run file of the
    wrong kind (a metrics.jsonl that is a folder, a checkpoints that is a file)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"the run dir {path} is an existing file; pass another hydra.run.dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"the run dir {path} is not writable ({error.strerror or error}); pass a "
                          f"writable hydra.run.dir") from None
    for name in RUN_FILES:
        entry, folder = path / name, name in RUN_FOLDERS
        if entry.exists() and entry.is_dir() != folder:
            raise RunDirError(f"{entry} is a {'file' if folder else 'folder'} where a run keeps its {name} "
                              f"{'folder' if folder else 'file'}; move it away or pass another hydra.run.dir")


class RunDirLock:
    """One run per run dir: an exclusive flock on <run dir>/run.lock, taken before minilm writes anything
    there and held until the run ends. A second process is refused in one line naming the holder (pid, host,
    start time), or waits for it with `wait`. The lock dies with its process (kill -9 included), so a lock
    file a dead run left is simply taken over. Re-entrant within a process: the entry point and the code it
    calls may each hold it. Data parallel: rank 0 holds it for every rank."""

    _held: dict[str, list] = {}  # realpath -> [fd, depth]: the run dirs this process holds

    def __init__(self, path: Path, wait: bool = False):
        self.path, self.wait = Path(path), wait
        self.key = None

    def __enter__(self):
        self.key = os.path.realpath(self.path)
        held = self._held.get(self.key)
        if held:
            held[1] += 1
            return self
        _make_run_dir(self.path)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                if not self.wait:
                    raise RunDirError(f"the run dir {self.path} is in use by another run ({holder}); wait for it "
                                      f"to end, pass train.wait_for_run_dir=true to wait for it, or pass another "
                                      f"hydra.run.dir") from None
                log.warning(f"waiting for the run dir {self.path}: in use by another run ({holder})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock if it was taken
            raise
        self._held[self.key] = [fd, 1]
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not recorded itself yet"

    def __exit__(self, *exc) -> None:
        held = self._held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            os.close(held[0])  # the lock file stays: unlinking it would let two processes lock two files


@contextlib.contextmanager
def run_dirs_held(jobs):
    """Hold the run dir lock of every job (anything with .run_dir and .cfg: an ensemble's members) inside."""
    with contextlib.ExitStack() as held:
        for job in jobs:
            held.enter_context(RunDirLock(job.run_dir, wait=job.cfg.train.wait_for_run_dir))
        yield


class RunDir:
    """A run dir and what an earlier attempt left in it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        _make_run_dir(self.path)

    def _read(self, name: str, parse) -> object:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return parse(path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise RunDirError(f"{path} is unreadable ({type(error).__name__}); move it away or pass another "
                              f"hydra.run.dir") from None

    @property
    def revisions(self) -> list[dict]:
        return self._read(REVISIONS_FILE, yaml.safe_load) or []

    def logged_config(self) -> dict | None:
        """The config the run dir's run trains with now: config.yaml with its revisions applied."""
        config = self._read(CONFIG_FILE, yaml.safe_load)
        return apply_revisions(config, self.revisions) if config else None

    def summary(self) -> dict | None:
        return self._read(SUMMARY_FILE, json.loads)

    def wandb_id(self) -> str | None:
        return (self._read(ENVIRONMENT_FILE, json.loads) or {}).get("wandb_run_id")

    def finished_summary(self, cfg) -> dict | None:
        """The summary of a run that already finished here with this config, which is then not trained again
        (the log says so); None when there is work to do. A finished run with a different config is refused:
        it is another run."""
        summary = self.summary()
        if not summary or summary.get("outcome") not in FINISHED or str(cfg.train.resume) != "auto":
            return None
        changes = math_changes(self.logged_config() or {}, cfg)
        if changes:
            raise RunDirError(f"{self.path} holds a finished run with another config ({describe(changes)}); use "
                              f"another hydra.run.dir, or train.resume=none to archive it and train this one")
        log.info(f"{self.path} already finished (outcome {summary['outcome']} at step {summary['step']}); not "
                 f"training it again. To train it further, start a new run dir from its last checkpoint with "
                 f"more steps: train.resume={self.path} train.max_steps=N train.allow_config_change=true "
                 f"hydra.run.dir=NEW_DIR (N > {summary['step']}, NEW_DIR a new dir); train.resume=none archives "
                 f"it and trains again from scratch")
        return summary

    def archive(self) -> Path | None:
        """Move an earlier run's files into archive/<time>/ (nothing is deleted); None if there were none."""
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return None
        target = self.path / "archive" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        target.mkdir(parents=True)
        for name in present:
            (self.path / name).rename(target / name)
        return target

    def record_revision(self, step: int, changes: dict[str, tuple]) -> None:
        revisions = self.revisions + [{"step": step, "changes": {key: {"from": a, "to": b}
                                                               for key, (a, b) in changes.items()}}]
        tmp = self.path / f".{REVISIONS_FILE}.tmp"
        tmp.write_text(yaml.safe_dump(revisions, sort_keys=False))
        tmp.replace(self.path / REVISIONS_FILE)
        log.warning(f"config revision recorded in {self.path / REVISIONS_FILE}: from step {step + 1}, "
                    f"{describe(changes)}")


def check_architecture(checkpoint_model: dict, model: torch.nn.Module, source: Path) -> None:
    """Refuse, in one line, a checkpoint whose parameters do not fit this config's model."""
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in checkpoint_model.items()}
    if ours == theirs:
        return
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    detail = "; ".join(part for part in (
        f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra else "",
        f"other shape: {shapes[0]} {theirs[shapes[0]]} vs {ours[shapes[0]]}" if shapes else "") if part)
    raise ConfigError(f"the checkpoint {source} holds another architecture ({detail}); an architecture cannot "
                      f"change on resume: use the logged model/norm config or another hydra.run.dir")


# ---------------------------------------------------------------- per step


class StepScalars:
    """Each step's loss and gradient norm, read on the host one step late.

    `record` starts an asynchronous copy to the host (CUDA: plus an event after it); `settle` waits
    for the oldest recorded step only, so while the host waits, the device keeps working on the
    step queued behind it. On CPU the copy is immediate.
    """

    def __init__(self):
        self.pending: tuple | None = None

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values, ready = torch.stack([loss.detach().float(), grad_norm.detach().float()]), None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.pending = (step, values, ready)

    def settle(self) -> tuple[int, float, float] | None:
        """(step, loss, grad norm) of the recorded step, or None if there is none."""
        if self.pending is None:
            return None
        (step, values, ready), self.pending = self.pending, None
        if ready is not None:
            ready.synchronize()
        loss, grad_norm = values.tolist()
        return step, loss, grad_norm


class Interrupted(KeyboardInterrupt):
    """A stop signal that stops the process at once; its message is the signal's name."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)


class StopSignals:
    """Install handlers (main thread only) so that a signal asks the run to stop after its current step;
    `at_once`: so that it raises Interrupted at once (outside the training steps)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, at_once: bool = False):
        self.received: int | None = None
        self.at_once = at_once
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.at_once or (self.received is not None and signum == signal.SIGINT):
            raise Interrupted(signum)  # nothing to finish, or the second Ctrl-C
        if self.received is None:
            self.received = signum
            log.warning(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                        f"(under torchrun: at the next train.log_interval boundary; Ctrl-C again to stop at once)")

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def __enter__(self):
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
