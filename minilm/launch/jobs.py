"""The job protocol that the command line and the Hydra launchers share: what a finished job gives
Hydra, the exit code its outcomes add up to, and how many CPU threads each of n side-by-side jobs takes."""

import os

from minilm.errors import EXIT_COMPLETED, EXIT_DIVERGED, EXIT_INTERRUPTED

_exit_code = EXIT_COMPLETED


def record_outcome(diverged: bool) -> None:
    global _exit_code
    if diverged:
        _exit_code = EXIT_DIVERGED


def exit_code() -> int:
    """The process's exit code after its jobs: EXIT_DIVERGED if any diverged."""
    return _exit_code


def job_result(summary: dict) -> float:
    """What a finished job gives Hydra: its final val loss (what sweepers such as Optuna minimize). An
    interrupted job stops the sweep (exit 75: rerunning it resumes); a diverged one sets the exit code."""
    if summary["outcome"] == "interrupted":
        raise SystemExit(EXIT_INTERRUPTED)
    record_outcome(bool(summary.get("diverged")))
    val_loss = summary.get("val/loss")
    return val_loss if val_loss is not None else float("inf")


def threads_per_job(n_jobs: int) -> int:
    """CPU threads for each of n_jobs processes that share this machine."""
    return max(1, (os.cpu_count() or 1) // n_jobs)
