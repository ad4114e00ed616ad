"""Seeding, deterministic mode, and capturing / restoring every RNG a run draws from."""

import os
import random

import numpy as np
import torch


def torch_seed(seed: int) -> int:
    """A torch generator's seed for any non-negative integer: torch takes 64 bits, so the seed modulo
    2**64 (every seed that fits keeps its stream; `seed=$(date +%s%N)` times a stride does not fit)."""
    return seed % 2**64


def seed_everything(seed: int) -> None:
    """One seed drives python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(torch_seed(seed))  # also seeds all CUDA devices


def set_deterministic(enabled: bool) -> None:
    """Bitwise-reproducible kernels. Must run before CUDA initializes (cuBLAS reads the env var then)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != enabled:  # the call imports Inductor: a second or so
        torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def rng_state() -> dict:
    """Every RNG's state, as tensors and plain values (so checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def torch_rng_state() -> dict:
    """The RNGs a training step draws from (dropout): torch's CPU and CUDA generators. Microseconds,
    where python's and numpy's take a hundred (the sampler and data never touch them mid-run)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` or `torch_rng_state` captured."""
    if "python" in state:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
