"""Every config composes; every invalid value fails early with one clear line."""

import subprocess
import sys

import pytest

from minilm.cli import CONFIG_DIR, compose, group_options, preflight
from minilm.config import validate

GROUPS = ["model", "norm", "precision", "data", "optim", "logger"]


def all_group_choices():
    for group in GROUPS + ["experiment"]:
        for option in group_options(group):
            yield f"{group}={option}"


def test_every_group_has_its_required_options():
    assert {"tiny", "small"} <= set(group_options("model"))
    assert {"layernorm", "rmsnorm"} <= set(group_options("norm"))
    assert set(group_options("precision")) == {"fp32", "fp16", "bf16"}
    assert {"wandb", "none"} <= set(group_options("logger"))


@pytest.mark.parametrize("choice", list(all_group_choices()))
def test_every_config_option_composes_and_validates(choice):
    extra = ["data.files=[README.md]"] if choice == "data=text" else []
    cfg = compose([choice, *extra])
    validate(cfg)
    assert cfg.seed == 0 and cfg.train.max_steps >= 0


def test_documented_top_level_names_exist():
    cfg = compose([])
    for key in ("seed", "deterministic", "detect_anomaly", "device"):
        assert key in cfg
    for key in ("max_steps", "batch_size", "grad_accum", "grad_clip", "eval_interval", "log_interval",
                "ckpt_interval"):
        assert key in cfg.train
    for key in ("placement", "n_layer", "n_head", "d_model", "block_size"):
        assert key in cfg.model
    for key in ("lr", "warmup_steps", "weight_decay"):
        assert key in cfg.optim
    assert {"eps", "affine"} <= set(cfg.norm)


@pytest.mark.parametrize("argv, expected", [
    (["norm=foo"], ["norm=foo", "layernorm", "rmsnorm"]),
    (["precision=fp8"], ["precision=fp8", "bf16", "fp16", "fp32"]),
    (["model.d_model=100", "model.n_head=3"], ["model.d_model=100", "n_head=3"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    (["train.foo=1"], ["train.foo", "batch_size", "+train.foo"]),
    (["model.placement=middle"], ["model.placement='middle'", "pre", "post"]),
    (["device=tpu"], ["device='tpu'", "cpu"]),
    (["-m", "norm=layernorm,bogus"], ["norm=bogus", "rmsnorm"]),
    (["-m", "optim.lr=1e-3,-1"], ["optim.lr=-1"]),
    (["data=text"], ["data.files"]),
])
def test_invalid_config_gives_one_line_error(argv, expected):
    error = preflight(argv)
    assert error is not None and "\n" not in error
    for fragment in expected:
        assert fragment in error, (fragment, error)


def test_valid_command_lines_pass_preflight():
    assert preflight([]) is None
    assert preflight(["-m", "norm=layernorm,rmsnorm", "precision=fp16,bf16", "seed=0,1,2"]) is None
    assert preflight(["+extra_key=1"]) is None


def test_train_py_fails_fast_with_one_line():
    result = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), "norm=foo"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: norm=foo is not a choice")
