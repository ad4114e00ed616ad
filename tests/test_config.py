"""Every config composes; every invalid value fails early with one clear line."""

import re
import subprocess
import sys

import pytest
import yaml

from minilm.config import validate
from minilm.errors import ConfigError
from minilm.launch.cli import CONFIG_DIR, compose, group_options, jobs_of, preflight

GROUPS = ["model", "norm", "precision", "data", "optim", "logger"]


def all_group_choices():
    for group in GROUPS + ["experiment"]:
        for option in group_options(group):
            yield f"{group}={option}"


def test_every_group_has_its_required_options():
    assert {"tiny", "small"} <= set(group_options("model"))
    assert {"layernorm", "rmsnorm"} <= set(group_options("norm"))
    assert {"fp32", "fp16", "bf16", "bf16_pure", "fp8"} <= set(group_options("precision"))
    assert {"wandb", "none"} <= set(group_options("logger"))


# A study alone is slow: tests/test_studies.py composes and validates each study's first job quickly.
@pytest.mark.parametrize("choice", [pytest.param(c, marks=[pytest.mark.slow] if c.startswith("experiment=") else [])
                                    for c in all_group_choices()])
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


@pytest.mark.parametrize("argv, expected", [  # the full table of bad inputs: tests/test_inputs.py
    (["norm=foo"], ["norm=foo", "layernorm", "rmsnorm"]),
    (["-m", "optim.lr=1e-3,-1"], ["optim.lr=-1"]),
    (["data=text"], ["data.files"]),
])
def test_invalid_config_gives_one_line_error(argv, expected):
    error = preflight(argv)
    assert error is not None and "\n" not in error
    for fragment in expected:
        assert fragment in error, (fragment, error)


@pytest.mark.slow
def test_valid_command_lines_pass_preflight():
    assert preflight([]) is None
    assert preflight(["-m", "norm=layernorm,rmsnorm", "precision=fp16,bf16", "seed=0,1,2"]) is None


@pytest.mark.slow
def test_preflight_expands_every_sweep_hydra_accepts():
    jobs = jobs_of(["norm=glob(*rms*)", "seed=range(0,2)", "model.qk_norm=choice(true,false)"], multirun=True)
    assert sorted(" ".join(job) for job in jobs) == sorted(
        f"norm={n} seed={s} model.qk_norm={q}" for n in ("rmsnorm", "triton_rmsnorm") for s in (0, 1)
        for q in ("True", "False"))
    assert preflight(["-m", "norm=glob(*rms*)", "seed=range(0,3)"]) is None
    # an interval (Optuna) stands for its two ends; the study's grid comes from hydra.sweeper.params
    lr_search = jobs_of(["experiment=lr_search"], multirun=True)
    assert [job[0] for job in lr_search] == ["optim.lr=0.0001", "optim.lr=0.1"]
    assert len(jobs_of(["experiment=lr_qknorm"], multirun=True)) == 14
    assert len(jobs_of(["experiment=lr_qknorm", "optim.lr=1e-3,1e-2"], multirun=True)) == 4  # the command line wins


@pytest.mark.slow
def test_the_optuna_search_runs_a_tiny_study(tmp_path):
    result = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), "-m", "experiment=lr_search",
                             "size=test", "train.max_steps=2", "hydra.sweeper.n_trials=2",
                             f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 1e-4 <= best["best_params"]["optim.lr"] <= 1e-1 and best["best_value"] < 7
    trials = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(trials) == 2 and all((p / "summary.json").exists() for p in trials)


def test_train_py_fails_fast_with_one_line():
    result = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), "norm=foo"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: norm=foo is not a choice")


@pytest.mark.parametrize("override, message", [
    ("model.mlp=bogus", "model.mlp=bogus is not valid; choose one of: gelu, relu2, swiglu"),
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("norm=foo", "norm=foo is not a choice"),
])
def test_compose_refuses_a_bad_override_in_one_line(override, message):
    # every command that composes a config (train.py's preflight, the bench scripts, minilm-coordcheck) gets
    # the same one line from compose itself
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as refused:
        compose([override])
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_a_bench_script_refuses_a_bad_override_in_one_line():
    script = CONFIG_DIR.parent / "scripts" / "bench" / "bench_model.py"
    result = subprocess.run([sys.executable, str(script), "--variants", "model.mlp=bogus"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    expected = "error: model.mlp=bogus is not valid; choose one of: gelu, relu2, swiglu"
    assert result.stderr.strip().splitlines() == [expected]
