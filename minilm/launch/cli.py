"""The entry layer: the one module that talks to Hydra.

`main` (train.py, `minilm-train`) first runs `preflight`: it composes every job the
command line asks for — each point of a `-m` sweep, including the grid a study declares in
`hydra.sweeper.params` and Hydra's glob(), range(), choice() and interval() sweeps — and
validates each one before any job starts, turning Hydra's multi-line errors into one line
that names the key, the value and what is valid. Then Hydra runs the jobs, and the process
exits with the code of the most severe outcome (minilm/errors.py).
"""

import itertools
import logging
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.config import (
    Config,
    EnsembleLauncherConfig,
    check_ensemble_launcher,
    check_runnable,
    resolve_device,
    schema_field,
    validate,
)
from minilm.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, ConfigError, MinilmError, RunDirError, input_errors
from minilm.launch.jobs import exit_code, job_result, record_outcome, threads_per_job

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "train"
MAX_PREFLIGHT_JOBS = 256
_HYDRA_FLAGS = {"-m", "--multirun"}

ConfigStore.instance().store(name="minilm_schema", node=Config)
ConfigStore.instance().store(group="hydra/launcher", name="ensemble_schema", node=EnsembleLauncherConfig)
# Multirun job dirs are named after their overrides (configs/hydra/default.yaml); clipping keeps a long
# command line under the filesystem's 255-byte name limit (the job number keeps names unique).
OmegaConf.register_new_resolver(
    "minilm.clip", lambda text, limit: str(text).encode()[: int(limit)].decode(errors="ignore"), replace=True)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(overrides: list[str] = (), hydra_node: bool = False):
    """The config train.py would see for these overrides (with the hydra node if asked); an override Hydra or
    OmegaConf refuses is a ConfigError of one line naming it."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(one_line(error, list(overrides))) from None


# ---------------------------------------------------------------- one-line errors


def _expected(key: str) -> str:
    """What the schema accepts for `key`, in words."""
    f = schema_field(key)
    kind = f.type if f is not None else None
    if get_origin(kind) in (Union, UnionType):  # X | None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if isinstance(kind, type) and issubclass(kind, Enum):
        return f"choose one of: {', '.join(member.value for member in kind)}"
    if kind is bool:
        return "expected a boolean: true or false"
    if kind is int:
        return "expected an integer"
    if kind is float:
        return "expected a number"
    if get_origin(kind) is list:
        return f"expected a list, e.g. {key}='[a,b]'"
    return "expected a string"


def _valid_keys(parent: str) -> str:
    f = schema_field(parent) if parent else None
    schema = Config if not parent else (f.type if f is not None and is_dataclass(f.type) else None)
    return ", ".join(sorted(x.name for x in fields(schema))) if schema else "?"


def _override_value(key: str, overrides: list[str]) -> str | None:
    for override in reversed(overrides):  # the last one given wins, as in Hydra
        name, sep, value = override.partition("=")
        if sep and name.lstrip("+~") == key:
            return value
    return None


def grammar_error(override: str, hydra_message: str) -> str:
    """An override Hydra's grammar cannot parse, as one line that names it, what is wrong and the fix."""
    key, _, value = override.partition("=")
    quoted = f"quote the value, as '{key}=\"{value}\"' (the single quotes keep the double ones from the shell)"
    odd = next((char for char in value if not char.isascii()), None)
    if odd is not None:
        return (f"{override} is not valid override syntax: {odd!r} (U+{ord(odd):04X}) cannot stand unquoted; "
                f"{quoted}; a number takes ASCII digits only")
    if value.endswith(","):
        return f"{override} is not valid override syntax: a trailing comma; remove it, or {quoted}"
    what = next((line for line in hydra_message.splitlines() if not line.startswith(("Error parsing", "See https"))),
                "Hydra's grammar refuses it")
    return f"{override} is not valid override syntax: {what}; {quoted}"


def one_line(error: Exception, overrides: list[str]) -> str:
    """A Hydra / OmegaConf composition error as one line naming the key, the value and the fix."""
    if isinstance(error, OverrideParseException):
        return grammar_error(error.override, error.message)
    if isinstance(error, MissingConfigException) and error.options is not None:
        bad = str(error.missing_cfg_file)
        group = bad.rsplit("/", 1)[0] if "/" in bad else bad
        return f"{bad.replace('/', '=', 1)} is not a choice; choose one of: {', '.join(group_options(group))}"
    cause = error
    while cause is not None and getattr(cause, "full_key", None) is None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if key and not key.startswith("hydra."):
        if "not in" in str(cause.msg) or "not in struct" in str(cause.msg):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            under = f" under {parent}" if parent else ""
            return f"unknown config key '{key}'; valid keys{under}: {_valid_keys(parent)}"
        value = _override_value(key, overrides)
        shown = f"{key}={value}" if value is not None else f"{key}"
        return f"{shown} is not valid; {_expected(key)}"
    return " ".join(str(error).split())


# ---------------------------------------------------------------- preflight


def _values(override) -> list[str]:
    """The values an override stands for: every point of a discrete sweep, the two ends of an interval."""
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    interval = override.value()  # interval(a, b) (Optuna): its bounds stand for the range
    return [str(interval.start), str(interval.end)]


def _check_bool_values(parsed) -> None:
    """OmegaConf turns any nonzero number into True: refuse numbers for boolean keys."""
    for override in parsed:
        f = schema_field(override.key_or_group)
        if f is None or f.type is not bool:
            continue
        values = [override.value()] if not override.is_sweep_override() or not override.is_discrete_sweep() \
            else list(override.sweep_iterator())
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                raise MinilmError(f"{override.key_or_group}={value} is not valid; {_expected(override.key_or_group)}")


def _study_params(non_sweep: list[str]) -> dict[str, str]:
    """The grid the composed config declares in hydra.sweeper.params (a study's sweep)."""
    cfg = compose(non_sweep, hydra_node=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    return {str(k): str(v) for k, v in params.items()}


def _parse(overrides: list[str]):
    """Hydra's parsed overrides (glob() needs the config loader to list a group's options)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(overrides)


def jobs_of(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job's override list, the way Hydra's sweepers build them: the study's grid first, then the
    command line (a key given on both takes the command line's values)."""
    parsed = _parse(overrides)
    _check_bool_values(parsed)
    non_sweep = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = _study_params(non_sweep)
    if not multirun:
        fixed = {o.key_or_group for o in parsed}
        unfixed = [key for key in params if key not in fixed]
        if unfixed:
            study = next((o.input_line for o in parsed if o.key_or_group == "experiment"), "this config")
            raise MinilmError(f"{study} is a sweep over {', '.join(unfixed)}: add -m to run its jobs, or fix "
                              f"{' '.join(k + '=...' for k in unfixed)} to run one")
        return [overrides]
    grid = _parse([f"{k}={v}" for k, v in params.items()])
    _check_bool_values(grid)
    axes = {o.key_or_group: [f"{o.get_key_element()}={v}" for v in _values(o)] for o in [*grid, *parsed]}
    return [list(job) for job in itertools.islice(itertools.product(*axes.values()), MAX_PREFLIGHT_JOBS)]


def check_job(overrides: list[str]) -> None:
    """Compose and validate one job; raises MinilmError or Hydra's / OmegaConf's composition errors."""
    cfg = compose(overrides)
    validate(cfg)
    check_runnable(cfg, resolve_device(cfg.device))


def check_output_dir(path: Path, key: str) -> None:
    """The dir Hydra will create for the run (or the sweep) must be creatable and writable."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{key}={path} is an existing file; pass another {key}")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{key}={path} cannot be created: {parent} is a file; pass another {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{key}={path} cannot be created: {parent} is not writable; pass another {key}")
    if parent != path:  # Hydra creates it: try once (a kernel's file system, /proc, refuses any new folder)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".minilm-probe-", dir=parent))
        except OSError as error:
            raise RunDirError(f"{key}={path} cannot be created in {parent} ({error.strerror or error}); pass "
                              f"another {key}") from None


def check_launcher(launcher) -> None:
    """hydra/launcher=ensemble's settings (the other launchers are Hydra plugins that check their own)."""
    if str(launcher.get("_target_", "")).endswith(".EnsembleLauncher"):
        check_ensemble_launcher(**OmegaConf.to_container(launcher, resolve=True))


def preflight(argv: list[str]) -> str | None:
    """A one-line error for the first invalid job the command line describes, or None if all are valid."""
    if any(arg.startswith("-") and arg not in _HYDRA_FLAGS for arg in argv):
        return None  # Hydra's own commands (--cfg, --info, ...): let Hydra handle them
    multirun = any(arg in _HYDRA_FLAGS for arg in argv)
    overrides = [arg for arg in argv if arg not in _HYDRA_FLAGS]
    user = [o for o in overrides if not o.startswith("hydra.")]
    try:
        non_sweep = [o.input_line for o in _parse(overrides) if not o.is_sweep_override()]
        hydra_node = compose(non_sweep, hydra_node=True).hydra
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_output_dir(Path(OmegaConf.select(hydra_node, key.removeprefix("hydra."))), key)
        check_launcher(hydra_node.launcher)
        for job in jobs_of(overrides, multirun):
            check_job([o for o in job if not o.startswith("hydra.")])
    except MinilmError as error:
        return str(error)
    except (HydraException, OmegaConfBaseException) as error:
        return one_line(error, user)
    return None


# ---------------------------------------------------------------- running


class SweepOutcome(Callback):
    """After a multirun the exit code says whether any job diverged: read from the jobs' summary.json,
    so jobs run by other processes (joblib, Slurm) count too."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        for path in Path(config.hydra.sweep.dir).glob("*/summary.json"):
            try:
                record_outcome(bool(json.loads(path.read_text()).get("diverged")))
            except (OSError, ValueError):
                continue


def share_cores(hydra_cfg) -> None:
    """Under a launcher that runs n_jobs jobs at once in this machine's processes (hydra/launcher=parallel,
    joblib), each job takes its share of the cores: n_jobs processes with every core's thread each would
    oversubscribe them."""
    launcher = OmegaConf.select(hydra_cfg, "launcher", default=None) or {}
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")).lower() else None
    if n_jobs and n_jobs > 0:
        import torch

        torch.set_num_threads(threads_per_job(n_jobs))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _hydra_main(cfg) -> float:
    from minilm.train.loop import train

    hydra_cfg = HydraConfig.get()
    share_cores(hydra_cfg)
    with input_errors():
        summary = train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                        choices=dict(hydra_cfg.runtime.choices))
    return job_result(summary)


def run_dir_lock(argv: list[str]):
    """The run dir lock of a single run whose hydra.run.dir is a plain path, to take before Hydra writes
    .hydra/ there (train() takes it again, re-entrantly); nothing for a sweep, Hydra's own commands (--cfg),
    a rank other than 0, or a dir whose name is only known once Hydra resolves it (a timestamp: train() locks
    it)."""
    if any(arg.startswith("-") for arg in argv) or int(os.environ.get("RANK", "0")) != 0:  # -m, Hydra's own
        return nullcontext()
    given = [o for o in _parse(argv) if o.key_or_group == "hydra.run.dir"]
    path = str(given[-1].value()) if given else ""
    if not path or "${" in path:
        return nullcontext()
    from minilm.train.lifecycle import RunDirLock

    wait = compose([a for a in argv if not a.startswith("hydra.")]).train.wait_for_run_dir
    return RunDirLock(Path(path), wait=wait)


def main() -> None:
    """train.py and `minilm-train`: preflight every job, run them, exit with the outcome's code."""
    cap_onednn_isa_if_amx_is_broken()  # before any bf16 matmul in this process
    # a log file on a full disk: its lines still reach the console, without a traceback for each one
    logging.raiseExceptions = False
    try:
        error = preflight(sys.argv[1:])
        if error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_INPUT_ERROR)
        with input_errors(), run_dir_lock(sys.argv[1:]):
            _hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C before the run, a second one, or a signal outside the steps
        print(f"interrupted ({stop or 'SIGINT'}): stopped at once; run the same command to resume from the last "
              f"checkpoint, or to start if none was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(exit_code())
