"""The errors a user can cause, and the exit code of every way a run can end.

A `MinilmError` is bad input, not a bug: its message is one line that names the bad
value (a key, a path, a file) and says what to do. The entry points print it as
`error: <message>` and exit with EXIT_INPUT_ERROR; anything else is a bug and keeps
its traceback. MINILM_TRACEBACK=1 shows the traceback of input errors too.
"""

import os
import sys
from contextlib import contextmanager

EXIT_COMPLETED = 0
EXIT_BUG = 1              # an uncaught exception: Python's own exit status
EXIT_INPUT_ERROR = 2      # bad config, data, checkpoint, run dir or source: nothing was trained
EXIT_DIVERGED = 3         # the run diverged (stopped at the step it was confirmed, or trained on past it)
EXIT_INTERRUPTED = 75     # Ctrl-C / SIGTERM / SIGUSR1: a checkpoint was written; the same command resumes
# by summary.json outcome ("paused": stopped on purpose by fit(until_step), e.g. reproduce --verify)
EXIT_CODES = {"completed": EXIT_COMPLETED, "paused": EXIT_COMPLETED, "diverged": EXIT_DIVERGED,
              "interrupted": EXIT_INTERRUPTED}


class MinilmError(Exception):
    """Bad input; the message is one line naming the value and the fix."""


class ConfigError(MinilmError):
    """A config value that is invalid, or cannot run on this machine."""


class DataError(MinilmError):
    """A data source, file or token cache that cannot be used."""


class CheckpointError(MinilmError):
    """A checkpoint or replay bundle that cannot be (safely) loaded."""


class RunDirError(MinilmError):
    """A run directory that cannot be written, or whose logged run conflicts with this one."""


class SourceError(MinilmError):
    """A logged run (run dir, W&B run) that cannot be read back."""


def _report(error: MinilmError) -> int:
    """Print an input error's one line (with MINILM_TRACEBACK set: raise it instead); its exit code."""
    if os.environ.get("MINILM_TRACEBACK"):
        raise error
    print(f"error: {error}", file=sys.stderr)
    return EXIT_INPUT_ERROR


def exit_on_input_error(run, argv=None) -> int:
    """Run a command's `run(argv)`; an input error becomes `error: <message>` and EXIT_INPUT_ERROR."""
    try:
        return run(argv)
    except MinilmError as error:
        return _report(error)


@contextmanager
def input_errors():
    """An input error (MinilmError) raised inside ends the process with its one line and EXIT_INPUT_ERROR."""
    try:
        yield
    except MinilmError as error:
        raise SystemExit(_report(error)) from None
