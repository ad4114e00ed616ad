"""How a run lives and ends: metrics never lost or duplicated, resume that cannot corrupt a run, exit
codes that tell the truth, sweeps safe to rerun, W&B by its own conventions."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from minilm import checkpoint
from minilm.errors import EXIT_DIVERGED, EXIT_INPUT_ERROR, EXIT_INTERRUPTED, ConfigError
from minilm.launch import reproduce
from minilm.launch.cli import compose
from minilm.rundir import read_metrics
from minilm.train.tracking import run_naming
from minilm.train.trainer import Trainer, train
from tests.helpers import ROOT, losses, make_trainer, run_training, train_command, with_tiny

COMMON = ["deterministic=true", "optim.warmup_steps=0", "model.dropout=0.1", "train.max_steps=12"]


def train_steps(rows):
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_a_checkpoint_is_never_ahead_of_the_metrics_it_implies(tmp_path, monkeypatch):
    seen = []
    save = checkpoint.save_atomic

    def recording_save(state, path, **kwargs):
        logged = train_steps(read_metrics(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else []
        seen.append((state["step"], logged[-1] if logged else 0))
        save(state, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_atomic", recording_save)
    run_training([*COMMON, "train.ckpt_interval=5", "train.log_interval=4"], tmp_path)
    assert [step for step, _ in seen] == [5, 10, 12]
    assert all(logged == step for step, logged in seen)  # every row up to the checkpoint is on disk


def simulate_kill(run_dir, overrides, at_step):
    """A run that dies at `at_step` without any cleanup, as under SIGKILL (rows already written stay)."""
    trainer = make_trainer(overrides, run_dir)
    trainer.fit(until_step=at_step)
    trainer.tracker._metrics_file.close()  # the process is gone: nothing else is flushed or finished


@pytest.mark.slow
def test_restart_after_a_kill_before_the_first_checkpoint_neither_duplicates_nor_hides_rows(tmp_path):
    full = losses(run_training(COMMON, tmp_path / "full"))
    run_dir = tmp_path / "killed"
    simulate_kill(run_dir, [*COMMON, "train.ckpt_interval=100"], at_step=5)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # the kill cut the last line in half
    rows = run_training(COMMON, run_dir)
    assert train_steps(rows) == list(range(1, 13))  # each step exactly once, none hidden behind a torn line
    assert losses(rows) == full


@pytest.mark.slow
def test_restart_after_a_kill_between_a_checkpoint_and_the_next_flush(tmp_path):
    full = losses(run_training(COMMON, tmp_path / "full"))
    run_dir = tmp_path / "killed"
    simulate_kill(run_dir, [*COMMON, "train.ckpt_interval=5", "train.log_interval=4"], at_step=7)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 5
    rows = run_training([*COMMON, "train.ckpt_interval=5", "train.log_interval=4"], run_dir)
    assert train_steps(rows) == list(range(1, 13)) and losses(rows) == full


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    full = losses(run_training(COMMON, tmp_path / "full"))
    run_dir = tmp_path / "run"
    simulate_kill(run_dir, [*COMMON, "train.ckpt_interval=4", "train.log_interval=1"], at_step=9)
    last = run_dir / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["step"] == 8 and checkpoint.load(last.with_name("previous.pt"))["step"] == 4
    last.write_bytes(last.read_bytes()[:1000])  # damaged after it was written (a bad copy, a failing disk)
    rows = run_training([*COMMON, "train.ckpt_interval=4", "train.log_interval=1"], run_dir)
    assert "resuming from the previous checkpoint" in caplog.text and "previous.pt (step 4)" in caplog.text
    assert train_steps(rows) == list(range(1, 13)) and losses(rows) == full


def interrupted_run(run_dir, overrides, at_step=6):
    """A run stopped with a checkpoint at `at_step`, as a preemption leaves it."""
    trainer = make_trainer(overrides, run_dir)
    trainer.fit(until_step=at_step)
    trainer.save_checkpoint()
    trainer.close()


@pytest.mark.slow
def test_resume_with_a_math_change_is_refused_in_one_line(tmp_path):
    interrupted_run(tmp_path, COMMON)
    logged = (tmp_path / "config.yaml").read_text()
    for change in (["optim.lr=0.05"], ["precision=fp16"], ["train.max_steps=20"]):
        with pytest.raises(ConfigError) as error:
            Trainer(compose(with_tiny(["optim.warmup_steps=0", *COMMON, *change])), tmp_path)
        message = str(error.value)
        assert "\n" not in message and "train.allow_config_change=true" in message
        assert change[0].split("=")[0].replace("precision", "precision.name") in message
    assert (tmp_path / "config.yaml").read_text() == logged  # the logged config was not rewritten


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused_even_when_changes_are_allowed(tmp_path):
    interrupted_run(tmp_path, COMMON)
    with pytest.raises(ConfigError, match="another architecture.*cannot change on resume"):
        Trainer(compose(with_tiny([*COMMON, "model.n_layer=3", "train.allow_config_change=true"])), tmp_path)


@pytest.mark.slow
def test_resume_with_a_bookkeeping_change_is_accepted(tmp_path):
    full = losses(run_training(COMMON, tmp_path / "full"))
    interrupted_run(tmp_path / "run", COMMON)
    rows = run_training([*COMMON, "train.log_interval=3", "train.eval_interval=4", "diagnostics=off"], tmp_path / "run")
    assert losses(rows) == full
    assert not (tmp_path / "run" / "config_revisions.yaml").exists()


@pytest.mark.slow
def test_an_allowed_change_is_recorded_and_reproduce_replays_it_bitwise(tmp_path, capsys):
    interrupted_run(tmp_path / "run", COMMON)
    run_training([*COMMON, "optim.lr=0.01", "train.allow_config_change=true"], tmp_path / "run")
    revisions = yaml.safe_load((tmp_path / "run" / "config_revisions.yaml").read_text())
    assert revisions == [{"step": 6, "changes": {"optim.lr": {"from": 3e-3, "to": 0.01}}}]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 3e-3  # as logged
    code = reproduce.main([str(tmp_path / "run"), "--verify", "12", "--out", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert code == 0 and "PASS: the first 12 losses are bitwise identical" in out, out


@pytest.mark.slow
def test_divergence_stops_the_run_at_its_step_with_a_nonzero_exit(tmp_path):
    result = subprocess.run(train_command(["optim.lr=1e6", "optim.warmup_steps=0", "train.divergence_window=1",
                                           "train.max_steps=20", "train.log_interval=10"], tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "diverged" and summary["diverged_at_step"] == 2 and summary["step"] == 2
    assert checkpoint.load(tmp_path / "checkpoints" / "diverged.pt")["step"] == 2
    assert train_steps(read_metrics(tmp_path)) == [1, 2]
    assert "run diverged at step 2/20" in result.stdout + result.stderr


def test_a_spike_that_comes_back_is_counted_not_a_divergence(tmp_path):
    trainer = make_trainer(["train.max_steps=8", "train.divergence_window=3", "train.log_interval=1"], tmp_path)
    line = trainer.divergence.threshold
    fake = iter([line - 1, line + 2, line + 3, line - 0.5, line - 1, line + 1, line + 1, line + 1])
    real = trainer.scalars.record
    trainer.scalars.record = lambda step, loss, grad: real(step, loss * 0 + next(fake), grad)
    summary = trainer.fit()
    trainer.close()
    assert summary["diverged_at_step"] == 6 and summary["outcome"] == "diverged" and summary["step"] == 8
    assert summary["spikes"] == [{"step": 2, "peak": pytest.approx(line + 3), "steps_above": 2, "recovered": True}]


def test_a_one_step_run_never_diverges_on_a_high_loss_at_init(tmp_path):
    trainer = make_trainer(["train.max_steps=1", "train.divergence_margin=0"], tmp_path)
    trainer.divergence.threshold = 0.0  # every loss is above this line
    summary = trainer.fit()
    trainer.close()
    assert not summary["diverged"] and summary["outcome"] == "completed"
    assert summary["spikes"][0]["recovered"] is False


@pytest.mark.slow
def test_sigint_checkpoints_writes_the_summary_and_finishes_wandb(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    process = subprocess.Popen(train_command(["train.max_steps=4000", "logger=wandb", "logger.mode=offline"],
                                             tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.time() + 120
    while not ((tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 3):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "interrupted" and summary["stopped_by"] == "SIGINT"
    assert checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)["step"] == summary["step"]
    assert train_steps(read_metrics(tmp_path)) == list(range(1, summary["step"] + 1))
    wandb_run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert b"interrupted" in next(wandb_run.glob("run-*.wandb")).read_bytes()  # the summary reached W&B
    log = (wandb_run / "logs" / "debug.log").read_text()
    assert "finishing run" in log and f"got exitcode: {EXIT_INTERRUPTED}" in log  # and the run was finished
    assert "Traceback" not in err and "run the same command to resume" in out + err


@pytest.mark.slow
def test_rerunning_a_sweep_skips_finished_jobs_and_duplicates_nothing(tmp_path):
    sweep = with_tiny(["logger=wandb", "logger.mode=offline", "train.max_steps=3", "optim.warmup_steps=0",
                       "train.divergence_window=1", f"hydra.sweep.dir={tmp_path}"])
    command = [str(ROOT / "train.py"), "-m", *sweep, "optim.lr=1e-3,1e6"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    first = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == EXIT_DIVERGED, first.stderr[-2000:]  # one job diverged: the sweep says so
    jobs = sorted(p for p in tmp_path.iterdir() if p.name[0].isdigit())
    before = {job: (read_metrics(job), sorted((job / "wandb").glob("*run-*"))) for job in jobs}
    again = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == EXIT_DIVERGED
    assert "already finished" in again.stdout + again.stderr
    for job in jobs:
        assert (read_metrics(job), sorted((job / "wandb").glob("*run-*"))) == before[job]  # nothing new
    forced = subprocess.run([sys.executable, *command, "train.resume=none"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert forced.returncode == EXIT_DIVERGED
    for job in jobs:
        assert list((job / "archive").iterdir())  # the earlier files were kept, not overwritten
        assert train_steps(read_metrics(job)) == train_steps(before[job][0])


def test_an_experiment_without_multirun_says_so(tmp_path):
    from minilm.launch.cli import preflight

    error = preflight(["experiment=postnorm_warmup"])
    assert error and "\n" not in error and "add -m" in error and "optim.warmup_steps" in error


# ---------------------------------------------------------------- W&B conventions


@pytest.mark.slow
def test_wandb_disabled_wins_writes_nothing_and_makes_no_network_call(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    calls = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        OSError("no network in this test")))
    run_training(["logger=wandb", "train.max_steps=2"], tmp_path)
    assert not (tmp_path / "wandb").exists() and calls == []
    assert json.loads((tmp_path / "environment.json").read_text())["wandb_run_id"] is None


@pytest.mark.slow
def test_wandb_offline_setting_wins_over_credentials(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network call expected"))
    caplog.set_level(logging.INFO, logger="minilm")
    run_training(["logger=wandb", "train.max_steps=1"], tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert "logs offline (WANDB_MODE / wandb settings)" in caplog.text and "wandb sync" in caplog.text


@pytest.mark.slow
def test_an_unreachable_server_falls_back_to_offline_within_seconds(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    caplog.set_level(logging.INFO, logger="minilm")
    start = time.monotonic()
    run_training(["logger=wandb", "train.max_steps=1"], tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")) and time.monotonic() - start < 60
    assert "did not answer" in caplog.text


def test_names_and_groups_are_readable_and_stable():
    a = run_naming(["seed=1", "precision=bf16", "norm=rmsnorm"])
    b = run_naming(["norm=rmsnorm", "seed=1", "precision=bf16"])
    assert a == b  # the order the overrides were typed in does not matter
    assert a[0] == "norm=rmsnorm,precision=bf16,seed=1" and a[1] == "norm=rmsnorm,precision=bf16"
    name, group, tags = run_naming([], {"model": "tiny", "norm": "layernorm", "precision": "fp32"})
    assert name == group == "tiny_layernorm_fp32"
    assert "study:zloss" in run_naming(["experiment=zloss"], {"experiment": "zloss"})[2]


@pytest.mark.slow
def test_resuming_from_another_runs_dir_starts_a_new_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = tmp_path / "first"
    interrupted_run(first, [*COMMON, "logger=wandb"])
    first_id = json.loads((first / "environment.json").read_text())["wandb_run_id"]
    summary = train(compose(with_tiny(["optim.warmup_steps=0", *COMMON, "logger=wandb", f"train.resume={first}"])),
                    tmp_path / "fork")
    env = json.loads((tmp_path / "fork" / "environment.json").read_text())
    assert summary["outcome"] == "completed" and env["wandb_run_id"] != first_id
    assert env["resumed_from"]["step"] == 6 and Path(env["resumed_from"]["checkpoint"]).parent.parent == first


def test_train_py_input_error_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "norm=foo"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == EXIT_INPUT_ERROR and result.stderr.startswith("error: norm=foo")


def test_data_parallel_ranks_agree_on_a_stop_at_flush_boundaries_only(tmp_path, monkeypatch):
    """Ranks of a data-parallel run agree on a stop with an all_reduce and a host sync: only at flush
    boundaries (every train.log_interval steps), never every step, and a signal stops the run at the next
    boundary with a checkpoint. Collectives stand in for the second rank (this one's values)."""
    import torch.distributed as dist

    from minilm.train import trainer as trainer_module

    trainer = make_trainer(["train.max_steps=12", "train.log_interval=5", "train.eval_interval=0",
                            "train.ckpt_interval=0"], tmp_path)
    trainer.world_size = 2
    agreed_at = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        if op == dist.ReduceOp.MAX:
            agreed_at.append(trainer.step)

    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None),
                                                                                                   [obj] * len(out)))
    step_alone = trainer.train_step

    def train_step():
        if trainer.step == 6:
            trainer.signals.received = signal.SIGTERM
        return step_alone()

    trainer.train_step = train_step
    summary = trainer.fit()
    trainer.close()
    assert agreed_at == [5, 10]
    assert summary["outcome"] == "interrupted" and summary["step"] == 10
    assert checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)["step"] == 10
