"""The entry layer: the one module below train.py that talks to Hydra.

`preflight` composes every job a command line asks for (each point of a -m
sweep too) and validates it before any job starts, turning Hydra's multi-line
errors into one line that names the bad value and the valid choices.
"""

import itertools
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minilm.config import ConfigError, validate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAME = "train"
MAX_PREFLIGHT_JOBS = 256
_HYDRA_FLAGS = {"-m", "--multirun"}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(overrides: list[str] = ()):
    """The config train.py would see for these overrides (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))


def _one_line(error: Exception, override_keys: list[str]) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None:
        bad = str(error.missing_cfg_file)
        group = bad.rsplit("/", 1)[0] if "/" in bad else bad
        return f"{bad.replace('/', '=', 1)} is not a choice; choose one of: {', '.join(group_options(group))}"
    text = " ".join(str(error).split())
    for key in override_keys:
        if f"Could not override '{key}'" in text or f"Key '{key.rsplit('.', 1)[-1]}' is not in struct" in text:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            base = compose([])
            node = OmegaConf.select(base, parent) if parent else base
            valid = ", ".join(sorted(node.keys())) if OmegaConf.is_dict(node) else "?"
            return (f"unknown config key '{key}'; valid keys{' under ' + parent if parent else ''}: {valid} "
                    f"(to add a new key on purpose use +{key}=...)")
    return text


def _jobs(overrides: list[str]) -> list[list[str]]:
    """Every job's override list: the cartesian product of the sweep overrides."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for override in parsed:
        if override.is_sweep_override() and not override.is_interval_sweep():
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(job) for job in itertools.islice(itertools.product(*axes), MAX_PREFLIGHT_JOBS)]


def preflight(argv: list[str]) -> str | None:
    """A one-line error for the first invalid job the command line describes, or None if all are valid."""
    if any(arg.startswith("-") and arg not in _HYDRA_FLAGS for arg in argv):
        return None  # Hydra's own commands (--cfg, --info, ...): let Hydra handle them
    overrides = [arg for arg in argv if arg not in _HYDRA_FLAGS]
    user_overrides = [o for o in overrides if not o.startswith("hydra.")]
    try:
        jobs = _jobs(user_overrides)
    except HydraException as error:
        return " ".join(str(error).split())
    keys = [o.split("=", 1)[0].lstrip("+~") for o in user_overrides]
    for job in jobs:
        try:
            validate(compose(job))
        except ConfigError as error:
            return str(error)
        except (HydraException, OmegaConfBaseException) as error:
            return _one_line(error, keys)
    return None
