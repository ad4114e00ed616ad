"""Checkpoints that survive being killed at any moment, and that never run code when loaded.

Writing: a checkpoint goes to a temporary file in the same directory, is flushed to disk, then
renamed over the old one: a rename is atomic, so a reader sees the old checkpoint or the new
one, never a half-written file, even after SIGKILL. The checkpoint it replaces is kept as
`previous.pt` (a hard link made before the rename), so a latest checkpoint damaged later (a
bad copy, a failing disk) still leaves one to resume from. A write that cannot succeed (too little
free space, checked first) or that fails (a full disk, a quota, an I/O error: torch's zip writer
reports those as a RuntimeError from inline_container.cc) is a RunDirError in one line, and the
checkpoint it would have replaced stays as it was.

Loading: `torch.load(weights_only=True)` only rebuilds tensors and plain Python containers,
so a crafted file cannot execute code; everything minilm saves is made of those. Any file
that is not such a checkpoint is refused with one line.
"""

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from minilm.errors import CheckpointError, RunDirError
from minilm.rundir import CHECKPOINTS_DIR

LAST, PREVIOUS = "last.pt", "previous.pt"


def free_bytes(path: Path) -> int:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def own_storage(state, copies: dict | None = None):
    """`state` with every tensor that is a view into a larger storage replaced by a copy of itself.

    torch.save writes a tensor's whole storage: a view into stacked parameters (an ensemble member's
    weights, minilm/train/ensemble.py) would otherwise carry every member's weights into one member's file.
    Tensors that own their storage are kept as they are (tied weights stay one tensor)."""
    copies = {} if copies is None else copies
    if isinstance(state, torch.Tensor):
        if state.untyped_storage().nbytes() <= state.numel() * state.element_size():
            return state
        return copies.setdefault(id(state), state.detach().clone())
    if isinstance(state, dict):
        return {key: own_storage(value, copies) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(own_storage(value, copies) for value in state)
    return state


def tensor_bytes(state) -> int:
    """The bytes of every distinct tensor storage in `state`: what torch.save writes, less its few headers."""
    storages = {}
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(storages.values())


def _is_write_failure(error: BaseException) -> bool:
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and (
        "inline_container.cc" in str(error) or "PytorchStreamWriter" in str(error)))


def save_atomic(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically; with keep_previous, the file it replaces becomes previous.pt."""
    state = own_storage(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed, free = tensor_bytes(state) + (1 << 20), free_bytes(path.parent)  # 1 MiB for pickle and zip headers
    if free < needed:
        raise RunDirError(f"not enough space to write {path}: it needs about {needed} bytes and {free} are free on "
                          f"its disk; free some space and run the same command again to resume from the checkpoint "
                          f"before it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            link = path.parent / f".{PREVIOUS}.tmp"
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, path.parent / PREVIOUS)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if not _is_write_failure(error):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else \
            f"write failed: {str(error).splitlines()[0]}"
        raise RunDirError(f"could not write {path} ({reason}; {free_bytes(path.parent)} bytes free on its disk); "
                          f"free some space and run the same command again to resume from the checkpoint before "
                          f"it") from None


def load(path: Path) -> dict:
    """A checkpoint or replay bundle minilm wrote; anything else raises CheckpointError in one line."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; pass a checkpoint file or a run dir") from None
    except pickle.UnpicklingError as error:
        reason = "it holds objects other than tensors and plain containers, and is not loaded for safety" \
            if "Weights only load failed" in str(error) else f"unpickling failed: {str(error).splitlines()[0]}"
        raise CheckpointError(f"{path} is not a minilm checkpoint: {reason}") from None
    except Exception as error:  # noqa: BLE001 - garbage makes the unpickler raise anything (EOFError, IndexError...)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (empty, truncated or corrupt: {first})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a minilm checkpoint: no training state in it")
    return state


def candidates(source: Path) -> list[Path]:
    """The checkpoints to try, newest first: `source` itself if a file, else a run dir's last and previous."""
    source = Path(source)
    if source.is_file():
        return [source]
    return [p for p in (source / CHECKPOINTS_DIR / LAST, source / CHECKPOINTS_DIR / PREVIOUS) if p.is_file()]


def load_latest(source: Path, log=print) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint of a run dir (falling back to previous.pt, saying so), or None if
    it has none; raises CheckpointError when every candidate is unreadable."""
    found = candidates(source)
    errors = []
    for path in found:
        try:
            state = load(path)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        if errors:
            log(f"warning: {errors[0]}; resuming from the previous checkpoint {path} (step {state['step']})")
        return state, path
    if errors:
        raise CheckpointError("; ".join(errors) + " — no readable checkpoint to resume from: pass train.resume=none "
                              "to start over (the run dir's files are kept)")
    return None
