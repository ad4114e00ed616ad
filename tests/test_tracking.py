"""W&B offline runs, fallback, and no secrets in anything a run writes."""

import json

import pytest
import yaml

from minilm.rundir import WANDB_CONFIG_FILE, WANDB_ENVIRONMENT_FILE, read_metrics
from minilm.train.tracking import Tracker, run_naming
from tests.helpers import run_training

WANDB_OFFLINE = ["logger=wandb", "logger.mode=offline", "train.max_steps=3"]


def wandb_files_dir(run_dir):
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0] / "files"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_resolved_config(tmp_path):
    run_training(WANDB_OFFLINE + ["norm=rmsnorm"], tmp_path)
    env = json.loads((tmp_path / "environment.json").read_text())
    files = wandb_files_dir(tmp_path)
    assert env["wandb_run_id"] and env["wandb_run_id"] in files.parent.name
    saved = yaml.safe_load((files / WANDB_CONFIG_FILE).read_text())
    assert saved["norm"]["kind"] == "rmsnorm" and saved["train"]["max_steps"] == 3
    assert saved == yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert json.loads((files / WANDB_ENVIRONMENT_FILE).read_text())["data_fingerprint"] == env["data_fingerprint"]


@pytest.mark.slow
def test_no_secret_is_written_anywhere(tmp_path, monkeypatch):
    secret = "local-0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    run_training(WANDB_OFFLINE, tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret leaked into {path}"


def test_wandb_failure_falls_back_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import wandb

    calls = []

    def failing_init(**kwargs):
        calls.append(kwargs["mode"])
        raise RuntimeError("cannot reach the W&B server")

    monkeypatch.setattr(wandb, "init", failing_init)
    rows = run_training(["logger=wandb", "logger.mode=online", "train.max_steps=2"], tmp_path)
    assert calls == ["online", "offline"]
    assert "falling back to offline" in caplog.text
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


@pytest.mark.slow
def test_auto_mode_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run_training(["logger=wandb", "logger.mode=auto", "train.max_steps=1"], tmp_path / "run")
    assert wandb_files_dir(tmp_path / "run").parent.name.startswith("offline-run-")


def test_names_group_seeds_together():
    name, group, tags = run_naming(["norm=rmsnorm", "precision=bf16", "seed=2"])
    assert name == "norm=rmsnorm,precision=bf16,seed=2" and group == "norm=rmsnorm,precision=bf16"
    assert tags == ["norm=rmsnorm", "precision=bf16", "seed=2"]


def test_metrics_file_survives_a_torn_last_line(tmp_path):
    from omegaconf import OmegaConf

    tracker = Tracker(tmp_path, OmegaConf.create({"backend": "none"}), {}, [])
    tracker.log({"train/loss": 1.5, "optim/grad_norm": float("inf")}, step=1)
    tracker.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # a crash mid-write
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.5, "optim/grad_norm": "inf"}]
