"""How a run lives and ends: metrics never lost or duplicated, resume that cannot corrupt a run, exit
codes that tell the truth, sweeps safe to rerun, W&B by its own conventions."""

import json
import logging
import math
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
from minilm.train.loop import train
from minilm.train.run import Run
from minilm.train.tracking import run_naming
from tests.helpers import ROOT, fit_alone, losses, make_run, run_training, train_command, with_tiny

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
    trainer = make_run(overrides, run_dir)
    fit_alone(trainer, until_step=at_step)
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
    trainer = make_run(overrides, run_dir)
    fit_alone(trainer, until_step=at_step)
    trainer.save_checkpoint()
    trainer.close()


@pytest.mark.slow
def test_resume_with_a_math_change_is_refused_in_one_line(tmp_path):
    interrupted_run(tmp_path, COMMON)
    logged = (tmp_path / "config.yaml").read_text()
    for change in (["optim.lr=0.05"], ["precision=fp16"], ["train.max_steps=20"]):
        with pytest.raises(ConfigError) as error:
            Run(compose(with_tiny(["optim.warmup_steps=0", *COMMON, *change])), tmp_path)
        message = str(error.value)
        assert "\n" not in message and "train.allow_config_change=true" in message
        assert change[0].split("=")[0].replace("precision", "precision.name") in message
    assert (tmp_path / "config.yaml").read_text() == logged  # the logged config was not rewritten


def forget_keys(run_dir, keys):
    """The run dir as code from before `keys` existed wrote it: the keys absent from config.yaml and last.pt."""
    def drop(config):
        for key in keys:
            group, name = key.split(".")
            del config[group][name]
    logged = yaml.safe_load((run_dir / "config.yaml").read_text())
    drop(logged)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(logged))
    path = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(path)
    drop(state["config"])
    checkpoint.save_atomic(state, path)


@pytest.mark.slow
def test_a_run_logged_before_a_key_existed_resumes_and_reproduces_with_its_default(tmp_path, capsys):
    full = losses(run_training(COMMON, tmp_path / "full"))
    interrupted_run(tmp_path / "run", COMMON)
    forget_keys(tmp_path / "run", ["norm.dyt_alpha", "train.wait_for_run_dir"])  # a math key and a bookkeeping one
    assert losses(run_training(COMMON, tmp_path / "run")) == full
    assert not (tmp_path / "run" / "config_revisions.yaml").exists()
    code = reproduce.main([str(tmp_path / "run"), "--verify", "12", "--out", str(tmp_path / "again")])
    captured = capsys.readouterr()
    assert code == 0 and "PASS" in captured.out, captured.out + captured.err
    assert "norm.dyt_alpha" in captured.err  # says which keys took their defaults
    interrupted_run(tmp_path / "changed", COMMON)
    forget_keys(tmp_path / "changed", ["norm.dyt_alpha"])
    with pytest.raises(ConfigError, match="norm.dyt_alpha"):  # a value other than the default is a change
        Run(compose(with_tiny([*COMMON, "norm.dyt_alpha=0.7"])), tmp_path / "changed")


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused_even_when_changes_are_allowed(tmp_path):
    interrupted_run(tmp_path, COMMON)
    with pytest.raises(ConfigError, match="another architecture.*cannot change on resume"):
        Run(compose(with_tiny([*COMMON, "model.n_layer=3", "train.allow_config_change=true"])), tmp_path)


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
def test_reproduce_refuses_a_config_yaml_that_disagrees_with_the_runs_checkpoint(tmp_path, capsys):
    interrupted_run(tmp_path / "run", COMMON)
    logged = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    logged["optim"]["lr"], logged["train"]["log_interval"] = 0.01, 3  # edited by hand after the run
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(logged))
    code = reproduce.main([str(tmp_path / "run"), "--verify", "2", "--out", str(tmp_path / "again")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_INPUT_ERROR and len(errors) == 1
    assert "config.yaml disagrees with the run's checkpoint" in errors[0] and "optim.lr (0.003" in errors[0]
    assert "log_interval" not in errors[0]  # bookkeeping may differ: a resume may change it
    assert not (tmp_path / "again").exists()


def fork(tmp_path, changes=()):
    """A run forked from another's checkpoint at step 6 (train.resume=<its run dir>), trained to the end."""
    interrupted_run(tmp_path / "parent", COMMON)
    summary = train(compose(with_tiny(["optim.warmup_steps=0", *COMMON, *changes,
                                       f"train.resume={tmp_path / 'parent'}"])), tmp_path / "fork")
    assert summary["outcome"] == "completed" and train_steps(read_metrics(tmp_path / "fork"))[0] == 7
    return tmp_path / "fork"


@pytest.mark.slow
def test_reproduce_replays_a_forks_parent_first_bitwise(tmp_path, capsys):
    forked = fork(tmp_path, ["optim.lr=0.01", "train.allow_config_change=true"])  # the fork changed the LR
    code = reproduce.main([str(forked), "--verify", "12", "--out", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert code == 0 and "PASS: the first 12 losses are bitwise identical" in out, out
    assert f"after its parent {tmp_path / 'parent'} up to step 6" in out
    assert train_steps(read_metrics(tmp_path / "again")) == list(range(1, 13))


@pytest.mark.slow
def test_reproduce_refuses_a_fork_whose_parent_is_gone_naming_it(tmp_path, capsys):
    forked = fork(tmp_path)
    (tmp_path / "parent").rename(tmp_path / "moved")
    code = reproduce.main([str(forked), "--out", str(tmp_path / "again")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_INPUT_ERROR and len(errors) == 1 and "forked from" in errors[0]
    assert f"parent run dir {tmp_path / 'parent'} is not here" in errors[0] and not (tmp_path / "again").exists()


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
    console_log = next(line.split("`")[1] for line in (ROOT / "docs" / "runs.md").read_text().splitlines()
                       if line.startswith("| `") and "the console log" in line)  # as the docs name it
    assert "run diverged at step 2/20" in (tmp_path / console_log).read_text()


def test_a_spike_that_comes_back_is_counted_not_a_divergence(tmp_path):
    trainer = make_run(["train.max_steps=8", "train.divergence_window=3", "train.log_interval=1"], tmp_path)
    line = trainer.divergence.threshold
    fake = iter([line - 1, line + 2, line + 3, line - 0.5, line - 1, line + 1, line + 1, line + 1])
    real = trainer.scalars.record
    trainer.scalars.record = lambda step, loss, grad: real(step, loss * 0 + next(fake), grad)
    summary = fit_alone(trainer)
    trainer.close()
    assert summary["diverged_at_step"] == 6 and summary["outcome"] == "diverged" and summary["step"] == 8
    assert summary["spikes"] == [{"step": 2, "peak": pytest.approx(line + 3), "steps_above": 2, "recovered": True}]


def test_a_one_step_run_completes_at_the_loss_at_init_and_diverges_only_above_the_line(tmp_path):
    summary = fit_alone(make_run(["train.max_steps=1"], tmp_path / "default"))
    assert not summary["diverged"] and summary["outcome"] == "completed"  # the margin covers the loss at init
    trainer = make_run(["train.max_steps=1"], tmp_path / "low")
    trainer.divergence.threshold = 0.0  # every loss is above this line
    summary = fit_alone(trainer)
    trainer.close()
    assert summary["outcome"] == "diverged" and summary["diverged_at_step"] == 1
    assert summary["divergence_reason"] == "its loss ended above the line" and summary["spikes"] == []


@pytest.mark.slow
def test_a_run_that_never_learned_ends_diverged_with_its_last_healthy_step(tmp_path):
    """optim.lr=1e4: above the line from step 2 on, and most updates skipped; 39 steps above the line are
    fewer than train.divergence_window's 50, but the run ends above the line, so it did not complete."""
    rows = run_training(["optim.lr=1e4", "train.max_steps=40"], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    line = summary["divergence_line"]
    assert all(loss > line for loss in losses(rows)[1:])  # the reproduction: never back under the line
    assert summary["outcome"] == "diverged" and summary["diverged"] and summary["step"] == 40
    assert summary["diverged_at_step"] == 2 and summary["divergence_confirmed_at_step"] == 40
    assert summary["divergence_reason"] == "its loss ended above the line"
    skipped = [r["step"] for r in rows if "train/loss" in r and not math.isfinite(float(r["optim/grad_norm"]))]
    assert len(skipped) > 20 and summary["optim/skipped_updates"] == len(skipped)  # fp32 counts them too
    assert [r["optim/skipped_updates"] for r in rows if "train/loss" in r][-1] == len(skipped)
    assert summary["last_healthy/step"] == 1
    assert math.isfinite(float(summary["last_healthy/optim/grad_norm"])) and summary["last_healthy/train/loss"] < line
    assert (tmp_path / "checkpoints" / "diverged.pt").exists()


@pytest.mark.slow
def test_last_healthy_is_a_finite_step_below_the_line(tmp_path):
    """optim.lr=10, 30 steps: the loss goes far above the line and stays; last_healthy is not the last step."""
    run_training(["optim.lr=10", "train.max_steps=30"], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "diverged" and summary["divergence_reason"] == "its loss ended above the line"
    assert summary["last_healthy/step"] < summary["diverged_at_step"]
    assert math.isfinite(float(summary["last_healthy/optim/grad_norm"]))
    assert summary["last_healthy/train/loss"] <= summary["divergence_line"]


@pytest.mark.parametrize("poisoned, outcome", [({2, 3, 4}, "diverged"), ({2, 4}, "completed")])
def test_a_run_whose_updates_were_mostly_skipped_did_not_complete(poisoned, outcome, tmp_path):
    """Non-finite gradients at the steps `poisoned` of 4: every such update is skipped (fp32: counted too);
    more than half skipped is a divergence, even with the loss below the line; half is not."""
    trainer = make_run(["train.max_steps=4"], tmp_path)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in poisoned else grad

    trainer.model.blocks[0].attn.qkv.weight.register_hook(poison)
    summary = fit_alone(trainer)
    trainer.close()
    assert summary["outcome"] == outcome and summary["optim/skipped_updates"] == len(poisoned)
    assert max(losses(read_metrics(tmp_path))) < summary["divergence_line"]
    if outcome == "diverged":
        assert summary["diverged_at_step"] == 2 and summary["divergence_reason"] == (
            "3 of its 4 updates were skipped (non-finite gradients)")
        assert summary["last_healthy/step"] == 1
    else:
        assert not summary["diverged"] and summary["last_healthy/step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_during_data_preparation_ends_interrupted_in_one_line(sig, tmp_path):
    """The token cache's lock is held here, so train.py waits inside data preparation when the signal comes."""
    import fcntl

    from minilm.data import corpus_fingerprint, load_corpus

    cfg = compose(with_tiny([]))
    data_cfg, cache_dir = cfg.data, cfg.paths.cache_dir
    fingerprint = corpus_fingerprint(load_corpus(data_cfg, cache_dir), data_cfg)
    lock_path = Path(cache_dir) / f"{data_cfg.source}-{fingerprint[:16]}.lock"
    command = train_command(["train.max_steps=1"], tmp_path)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "waiting for another process building the token cache" in line:
                process.send_signal(sig)
                break
        output = "".join(seen) + process.stdout.read()
        process.wait(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output[-2000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-2000:]
    assert output.strip().splitlines()[-1].startswith(f"interrupted ({signal.Signals(sig).name}): stopped at once")
    assert not (tmp_path / "checkpoints").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)  # the same command trains
    assert result.returncode == 0, result.stderr[-2000:]


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

    from minilm.train import run as run_module

    trainer = make_run(["train.max_steps=12", "train.log_interval=5", "train.eval_interval=0",
                            "train.ckpt_interval=0"], tmp_path)
    trainer.world_size = 2
    agreed_at = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        if op == dist.ReduceOp.MAX:
            agreed_at.append(trainer.step)

    monkeypatch.setattr(run_module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(run_module.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None),
                                                                                                   [obj] * len(out)))
    step_alone = trainer.train_step

    def train_step():
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: stop after this step
        return step_alone()

    trainer.train_step = train_step
    summary = fit_alone(trainer)
    trainer.close()
    assert agreed_at == [5, 10]
    assert summary["outcome"] == "interrupted" and summary["step"] == 10
    assert checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)["step"] == 10


def test_a_kill_during_the_end_of_run_sample_resumes_without_a_second_val_row(tmp_path, monkeypatch):
    overrides = ["train.max_steps=3", "train.sample_tokens=4", "train.eval_interval=2"]

    def killed(self):
        raise KeyboardInterrupt  # as a kill -9 there would: the final checkpoint and val row are written

    with monkeypatch.context() as patch:
        patch.setattr(Run, "sample", killed)
        with pytest.raises(KeyboardInterrupt):
            run_training(overrides, tmp_path)
    assert checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)["step"] == 3
    rows = run_training(overrides, tmp_path)
    val_rows = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert [step for step, _ in val_rows] == [2, 3]  # each once
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["val/loss"] == val_rows[-1][1] and summary["sample"]
    assert train_steps(rows) == [1, 2, 3]


@pytest.mark.slow
def test_a_finished_run_says_how_to_extend_it_and_that_command_works(tmp_path, caplog):
    first, extended = tmp_path / "first", tmp_path / "extended"
    base = ["optim.warmup_steps=0"]
    rows = run_training([*base, "train.max_steps=3"], first)
    with caplog.at_level(logging.INFO, logger="minilm"):
        again = train(compose(with_tiny([*base, "train.max_steps=3"])), first)
    assert again["outcome"] == "completed" and read_metrics(first) == rows  # not trained again
    message = next(r.getMessage() for r in caplog.records if "already finished" in r.getMessage())
    told = message.split("more steps: ")[1].split(" (N > 3, NEW_DIR a new dir)")[0].split()
    assert told[0] == f"train.resume={first}" and told[-1] == "hydra.run.dir=NEW_DIR"
    command = [o.replace("=N", "=5") for o in told[:-1]]  # as a user fills it in (hydra.run.dir: `extended`)
    run_training([*base, *command], extended)
    summary = json.loads((extended / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["step"] == 5
    assert train_steps(read_metrics(extended)) == [4, 5]  # it went on from the checkpoint at step 3
    assert json.loads((extended / "environment.json").read_text())["resumed_from"]["step"] == 3
    assert read_metrics(first) == rows  # the finished run is untouched


# ---------------------------------------------------------------- one run per run dir


def hold_in_another_process(run_dir):
    """A process that holds run_dir's lock until killed; returns it once the lock is held."""
    code = ("import sys; from minilm.train.lifecycle import RunDirLock\n"
            "with RunDirLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_run_dir_held_by_another_process_is_refused_and_taken_over_once_it_died(tmp_path):
    from minilm.errors import RunDirError
    from minilm.train.lifecycle import RunDirLock

    holder = hold_in_another_process(tmp_path)
    with pytest.raises(RunDirError) as error, RunDirLock(tmp_path):
        pass
    message = str(error.value)
    assert "\n" not in message and f"pid {holder.pid} on host {socket.gethostname()}, started " in message
    assert "train.wait_for_run_dir=true" in message
    holder.kill()  # kill -9: no cleanup, the lock file stays behind
    holder.wait()
    with RunDirLock(tmp_path), RunDirLock(tmp_path):  # a dead process's lock is free; re-entrant in one process
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def wait_for(condition, process, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"{what}: exit {process.poll()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_train_py_in_one_run_dir_second_refused_or_waits_no_step_twice(tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "waiting.log"
    command = train_command(["train.max_steps=100000", "train.ckpt_interval=20", "seed=1"], run_dir)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiting = None
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 25, first, "first")
        second = subprocess.run(train_command(["train.max_steps=100000", "seed=2"], run_dir), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == EXIT_INPUT_ERROR, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the run dir"), second.stderr[-2000:]
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert "seed=2" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # nothing written in the dir
        with open(log_path, "w") as log_file:  # asked to wait, it takes over when the first is killed
            waiting = subprocess.Popen([*command, "train.wait_for_run_dir=true"], stdout=log_file, stderr=log_file)
        wait_for(lambda: "waiting for the run dir" in log_path.read_text(), waiting, "waiting")
        assert first.poll() is None
        first.kill()
        first.wait()
        killed_at = train_steps(read_metrics(run_dir))[-1]
        # trains past the step the first one reached: resumed, and its stop signal handlers are in place
        wait_for(lambda: train_steps(read_metrics(run_dir))[-1] > killed_at, waiting, "resume", timeout=600)
        assert "resumed from" in log_path.read_text()
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=120) == EXIT_INTERRUPTED, log_path.read_text()[-2000:]
    finally:
        for process in (first, waiting):
            if process is not None and process.poll() is None:
                process.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert train_steps(read_metrics(run_dir)) == list(range(1, summary["step"] + 1))  # each step exactly once
