"""Checkpoints that survive being killed at any moment.

A checkpoint is written to a temporary file in the same directory, flushed to
disk, then renamed over the old one: a rename is atomic, so a reader sees the
old checkpoint or the new one, never a half-written file, even after SIGKILL.
"""

import os
import tempfile
from pathlib import Path

import torch

LAST = "last.pt"


def save_atomic(state: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    # weights_only=False: checkpoints hold RNG states and numpy objects we wrote ourselves.
    return torch.load(path, map_location="cpu", weights_only=False)


def find_checkpoint(source: Path) -> Path | None:
    """The checkpoint to resume from: `source` itself if a file, else a run dir's latest."""
    source = Path(source)
    if source.is_file():
        return source
    candidate = source / "checkpoints" / LAST
    return candidate if candidate.is_file() else None
