"""Batched ensembles (minilm/train/ensemble.py): each member trains as the same run made alone, to a stated
tolerance; a diverging or non-finite member touches no other; a member's checkpoint is a solo run's;
hydra/launcher=ensemble groups a multirun and prints the plan; hydra/launcher=parallel runs jobs side by side.

Tolerance (fp32, CPU, deterministic): a member's first loss is bitwise the solo run's (same init, same data,
the batched forward is exact); later losses agree within MEMBER_RTOL, because vmap's batching rule reduces
the norm layers' weight and bias gradients in another order (about 1e-7 relative per step, measured).
Under bf16 autocast the batched matmuls round differently already in the forward: BF16_MEMBER_RTOL.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from minilm import checkpoint
from minilm.errors import EXIT_INPUT_ERROR
from minilm.launch.cli import compose
from minilm.rundir import read_metrics
from minilm.train.ensemble import Ensemble, MemberJob, ensemble_key, split, train_ensemble, unbatchable_reason
from minilm.train.loop import train
from minilm.train.run import Run
from tests.helpers import ROOT, fit_alone, losses, with_tiny

MEMBER_RTOL = 1e-5  # fp32, 10 steps: measured up to 1.6e-7
BF16_MEMBER_RTOL = 1e-3
COMMON = ["optim.warmup_steps=0", "deterministic=true", "logger=none", "train.eval_interval=0"]


def config(overrides: list[str]):
    return compose(with_tiny([*COMMON, *overrides]))


def run_alone(overrides: list[str], run_dir) -> list[dict]:
    train(config(overrides), run_dir, overrides)
    return read_metrics(run_dir)


def run_ensemble(arms: list[list[str]], tmp_path, name: str = "member") -> list[dict]:
    jobs = [MemberJob(config(arm), tmp_path / f"{name}{i}", arm) for i, arm in enumerate(arms)]
    return train_ensemble(jobs)


def assert_same_run(member_dir, alone_dir) -> None:
    member, alone = losses(read_metrics(member_dir)), losses(read_metrics(alone_dir))
    assert len(member) == len(alone) > 1
    assert member[0] == alone[0]  # the same init and data: the batched forward is exact
    for step, (a, b) in enumerate(zip(member, alone), start=1):
        assert a == pytest.approx(b, rel=MEMBER_RTOL), f"step {step}"


def test_grouping_keys():
    base = config([])
    assert ensemble_key(config(["optim.lr=1e-2", "seed=3", "optim.weight_decay=0", "train.grad_clip=0.5",
                                "optim.z_loss=1e-4", "optim.warmup_steps=5"])) == ensemble_key(base)
    for other in (["model.qk_norm=true"], ["norm=rmsnorm"], ["precision=bf16"], ["train.batch_size=4"]):
        assert ensemble_key(config(other)) != ensemble_key(base), other
    assert unbatchable_reason(base) is None
    assert "dropout" in unbatchable_reason(config(["model.dropout=0.1"]))
    assert "triton" in unbatchable_reason(config(["norm=triton_rmsnorm"]))
    assert "norm=triton_dyt" in unbatchable_reason(config(["norm=triton_dyt"]))
    assert unbatchable_reason(config(["norm=dyt"])) is None
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split(list(range(4)), 9) == [[0, 1, 2, 3]]


@pytest.mark.slow
def test_members_train_as_their_runs_alone(tmp_path):
    arms = [["optim.lr=1e-3", "seed=0"], ["optim.lr=3e-3", "seed=1", "optim.weight_decay=0"],
            ["optim.lr=1e-2", "seed=0", "optim.z_loss=1e-3", "train.grad_clip=0.3", "optim.warmup_steps=3"]]
    arms = [[*arm, "train.max_steps=8", f"train.sample_tokens={tokens}"] for arm, tokens in zip(arms, (40, 0, 12))]
    summaries = run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        run_alone(arm, tmp_path / f"alone{i}")
        assert_same_run(tmp_path / f"member{i}", tmp_path / f"alone{i}")
        alone = json.loads((tmp_path / f"alone{i}" / "summary.json").read_text())
        assert summaries[i]["outcome"] == "completed" and summaries[i]["val/loss"] == pytest.approx(
            alone["val/loss"], rel=MEMBER_RTOL)
        assert summaries[i].get("sample") == alone.get("sample") and ("sample" in alone) == (i != 1)
        record = json.loads((tmp_path / f"member{i}" / "environment.json").read_text())
        assert record["ensemble"]["members"] == 3 and record["ensemble"]["member"] == i
        if "optim.z_loss=1e-3" in arm:
            rows = read_metrics(tmp_path / f"member{i}")
            assert all("train/z_loss" in row for row in rows if "train/loss" in row)


@pytest.mark.slow
def test_muon_members_train_as_their_runs_alone(tmp_path):
    """Each member has its own Muon + AdamW, stepping the member's views into the stacked parameters; a member's
    QK-clip observes and clips its own heads."""
    arms = [["optim=muon", "optim.lr=0.02", "seed=0"], ["optim=muon", "optim.lr=0.05", "seed=1"], ["seed=2"],
            ["optim=muon", "optim.lr=0.05", "seed=1", "optim.qk_clip_tau=0.1"]]
    arms = [[*arm, "train.max_steps=6", "train.sample_tokens=0"] for arm in arms]
    run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        run_alone(arm, tmp_path / f"alone{i}")
        assert_same_run(tmp_path / f"member{i}", tmp_path / f"alone{i}")
    clips = [[r.get("optim/qk_clipped_heads") for r in read_metrics(tmp_path / run) if "train/loss" in r]
             for run in ("member3", "alone3")]
    assert clips[0] == clips[1] and sum(clips[0]) > 0
    assert losses(read_metrics(tmp_path / "member3")) != losses(read_metrics(tmp_path / "member1"))  # it clipped


@pytest.mark.slow
def test_mup_members_train_as_their_runs_alone(tmp_path):
    """μP's per-group LR scales and output multiplier are each member's own, as in its run alone."""
    arms = [["optim.lr=3e-3", "seed=0"], ["optim.lr=1e-2", "seed=1"]]
    arms = [[*arm, "model.parametrization=mup", "train.max_steps=4", "train.sample_tokens=0"] for arm in arms]
    run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        run_alone(arm, tmp_path / f"alone{i}")
        assert_same_run(tmp_path / f"member{i}", tmp_path / f"alone{i}")


def test_members_draw_their_samples_as_alone(tmp_path):
    """An ensemble draws its members' end-of-run samples in one batched generation: each is what its model
    draws alone (the same weights, the same seed), at its own length, past the context (block_size 32)."""
    arms = [["seed=0", "train.sample_tokens=40"], ["seed=1", "train.sample_tokens=12", "optim.lr=1e-2"]]
    trainers = [Run(config(arm), tmp_path / f"member{i}", arm, own_rng=True) for i, arm in enumerate(arms)]
    ensemble = Ensemble(trainers)
    for _ in range(2):
        ensemble.step()
    alone = [trainer.sample() for trainer in trainers]
    assert ensemble.samples(trainers) == alone
    assert alone[0] != alone[1] and len(trainers[0].data.encode(alone[0])) > 32


@pytest.mark.slow
def test_dyt_members_train_as_their_runs_alone(tmp_path):
    """DyT under vmap: each member's alpha, gain and bias are its own (alpha's gradient a sum over the member's
    elements only)."""
    arms = [["norm=dyt", "seed=0", "train.max_steps=4"], ["norm=dyt", "norm.dyt_alpha=1.0", "seed=1",
                                                          "optim.lr=1e-2", "train.max_steps=4"]]
    run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        run_alone(arm, tmp_path / f"alone{i}")
        assert_same_run(tmp_path / f"member{i}", tmp_path / f"alone{i}")


@pytest.mark.slow
def test_bf16_members_track_their_runs_alone(tmp_path):
    """Under bf16 autocast the batched matmuls round differently from single ones already in the forward:
    a member's losses stay within BF16_MEMBER_RTOL of its run alone (measured: about 1e-5 over 3 steps)."""
    arms = [["precision=bf16", "seed=0", "train.max_steps=3"], ["precision=bf16", "seed=1", "optim.lr=1e-2",
                                                                 "train.max_steps=3"]]
    run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        member = losses(read_metrics(tmp_path / f"member{i}"))
        alone = losses(run_alone(arm, tmp_path / f"alone{i}"))
        assert len(member) == 3 and member == pytest.approx(alone, rel=BF16_MEMBER_RTOL)


@pytest.mark.slow
def test_each_member_logs_to_its_own_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    arms = [["logger=wandb", "logger.mode=offline", "seed=0", "train.max_steps=2"],
            ["logger=wandb", "logger.mode=offline", "seed=1", "train.max_steps=2"]]
    jobs = [MemberJob(compose(with_tiny([*COMMON[:2], *arm])), tmp_path / f"member{i}", arm)
            for i, arm in enumerate(arms)]
    train_ensemble(jobs)
    ids = [json.loads((tmp_path / f"member{i}" / "environment.json").read_text())["wandb_run_id"] for i in range(2)]
    assert ids[0] and ids[1] and ids[0] != ids[1]
    for i, run_id in enumerate(ids):
        runs = list((tmp_path / f"member{i}" / "wandb").glob(f"offline-run-*-{run_id}"))
        assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0


def step_results(trainer: Run, result) -> tuple[float, float, float]:
    loss, grad_norm, skipped_so_far = result
    return loss.item(), grad_norm.item(), skipped_so_far.item()


# the quick tier: Precision.step's skip under AdamW, the fp16 scaler's under Muon
@pytest.mark.parametrize("precision,optim", [("fp32", "adamw"), pytest.param("fp32", "muon", marks=pytest.mark.slow),
                                             pytest.param("fp16", "adamw", marks=pytest.mark.slow), ("fp16", "muon")])
def test_a_nonfinite_member_is_skipped_alone(precision, optim, tmp_path):
    """Poison one member's gradients at step 2: its update is skipped (fp16: its own scaler backs off), the
    other member steps as usual."""
    trainers = [Run(config([f"precision={precision}", f"optim={optim}", f"seed={i}", "train.max_steps=4"]),
                    tmp_path / f"m{i}", own_rng=True) for i in range(2)]
    ensemble = Ensemble(trainers)
    ensemble.step()
    scales = [t.precision.scale() for t in trainers]
    stacked = ensemble.params["blocks.0.mlp.fc.weight"]
    stacked.register_hook(lambda g: torch.cat([g[:1], torch.full_like(g[1:], math.inf)]))
    before = {name: p.detach().clone() for name, p in ensemble.params.items()}
    results = ensemble.step()
    assert math.isfinite(step_results(trainers[0], results[0])[1]) and step_results(trainers[0], results[0])[2] == 0
    assert not math.isfinite(step_results(trainers[1], results[1])[1])
    assert step_results(trainers[1], results[1])[2] == 1  # counted, its own count
    for name, p in ensemble.params.items():
        assert torch.equal(p[1], before[name][1]), f"{name}: the poisoned member's step reached its weights"
    assert not torch.equal(ensemble.params["blocks.0.mlp.fc.weight"][0], before["blocks.0.mlp.fc.weight"][0])
    if precision == "fp16":
        assert trainers[0].precision.scale() == scales[0]
        assert trainers[1].precision.scale() == scales[1] / 2  # its scaler alone saw the inf
    for trainer in trainers:
        trainer.close()


@pytest.mark.slow
def test_a_diverging_member_ends_alone_and_the_others_train_on(tmp_path):
    divergence = ["train.divergence_window=2", "train.grad_clip=0", "train.max_steps=8"]
    arms = [["optim.lr=1e-3", *divergence], ["optim.lr=30", *divergence]]
    summaries = run_ensemble(arms, tmp_path)
    assert summaries[1]["outcome"] == "diverged" and summaries[1]["step"] < 8
    assert (tmp_path / "member1" / "checkpoints" / "diverged.pt").exists()
    assert summaries[0]["outcome"] == "completed" and summaries[0]["step"] == 8
    run_alone(arms[0], tmp_path / "alone0")
    assert_same_run(tmp_path / "member0", tmp_path / "alone0")
    run_alone(arms[1], tmp_path / "alone1")  # the diverged member stopped where it stops alone
    alone = json.loads((tmp_path / "alone1" / "summary.json").read_text())
    assert (summaries[1]["diverged_at_step"], summaries[1]["step"]) == (alone["diverged_at_step"], alone["step"])


@pytest.mark.slow
def test_a_member_checkpoint_resumes_in_a_run_alone(tmp_path):
    arms = [["seed=0", "train.max_steps=3"], ["seed=1", "optim.lr=1e-2", "train.max_steps=3"]]
    summaries = run_ensemble(arms, tmp_path)
    member = tmp_path / "member1"
    state = checkpoint.load(member / "checkpoints" / checkpoint.LAST)
    alone = Run(config(arms[1] + [f"train.resume={member}"]), tmp_path / "alone")
    assert alone.step == 3
    assert state.keys() == alone.state_dict().keys()
    # the member's file holds its own weights only, not the stacked ones of every member
    weights = sum(t.numel() for t in state["model"].values() if t is not state["model"].get("lm_head.weight"))
    assert (member / "checkpoints" / checkpoint.LAST).stat().st_size < 6 * 4 * weights
    resumed = fit_alone(alone)  # at max_steps already: evaluates the member's weights
    alone.close()
    assert resumed["val/loss"] == summaries[1]["val/loss"]
    # its RNG streams are its own, as the run alone records them (not another member's)
    run_alone(arms[1], tmp_path / "solo")
    solo = checkpoint.load(tmp_path / "solo" / "checkpoints" / checkpoint.LAST)["rng"][0]
    assert torch.equal(state["rng"][0]["torch"], solo["torch"]) and state["rng"][0]["python"] == solo["python"]


def train_py(args: list[str], sweep_dir, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *with_tiny(args),
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def job_summaries(sweep_dir) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.slow
def test_ensemble_launcher_groups_a_multirun_and_prints_the_plan(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["logger=none", "train.max_steps=3", "optim.lr=1e-3,3e-3", "model.qk_norm=false,true",
            "model.dropout=0,0.1"]
    proc = train_py(["hydra/launcher=ensemble", *grid], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if "[HYDRA]" in line]
    assert "Ensemble launcher: 8 jobs as 2 batched ensemble(s) and 4 run(s) alone" in plan
    ensembles = [line for line in plan if line.startswith("\tensemble of 2: ")]
    assert len(ensembles) == 2 and all("model.dropout=0 " in line for line in ensembles)
    assert sum("alone (model.dropout=0.1" in line for line in plan) == 4
    summaries = job_summaries(sweep)
    assert len(summaries) == 8 and all(s["outcome"] == "completed" and s["step"] == 3 for s in summaries.values())
    for job in sweep.glob("*/metrics.jsonl"):
        assert [row["step"] for row in read_metrics(job.parent) if "train/loss" in row] == [1, 2, 3]
        assert (job.parent / ".hydra" / "overrides.yaml").exists()

    # the same command again, one member per ensemble at most: the groups are split, nothing is trained again
    again = train_py(["hydra/launcher=ensemble", *grid, "hydra.launcher.max_members=1"], sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("jobs split into 2 ensembles") == 2 and again.stdout.count("already finished") == 8


@pytest.mark.slow
def test_ensemble_launcher_trains_ensembles_side_by_side(tmp_path):
    """hydra.launcher.n_jobs=2: the group is split in two ensembles, trained in two processes at once; each
    member trains as in the same ensemble in this process and writes its own log."""
    grid = ["logger=none", "train.max_steps=3", "deterministic=true", "optim.lr=1e-3,3e-3", "seed=0,1"]
    side = train_py(["hydra/launcher=ensemble", "hydra.launcher.n_jobs=2", *grid], tmp_path / "side")
    assert side.returncode == 0, side.stderr[-3000:]
    assert "4 jobs as 2 batched ensemble(s) and 0 run(s) alone, 2 at a time in processes of their own" in side.stdout
    together = train_py(["hydra/launcher=ensemble", "hydra.launcher.max_members=2", *grid], tmp_path / "together")
    assert together.returncode == 0, together.stderr[-3000:]
    jobs = sorted((tmp_path / "side").glob("*/summary.json"))
    assert len(jobs) == 4
    for job in (path.parent for path in jobs):
        member, alone = losses(read_metrics(job)), losses(read_metrics(tmp_path / "together" / job.name))
        assert len(member) == 3 and member == pytest.approx(alone, rel=MEMBER_RTOL)
        assert f"run dir {job}" in next(job.glob("*.log")).read_text()  # its closing line, in its own log
    bad = train_py(["hydra/launcher=ensemble", "hydra.launcher.n_jobs=0", *grid], tmp_path / "bad")
    assert bad.returncode == EXIT_INPUT_ERROR and bad.stderr.startswith("error: hydra.launcher.n_jobs=0 is not valid")
    assert not (tmp_path / "bad").exists()  # refused before any job dir


@pytest.mark.slow
def test_parallel_launcher_runs_jobs_side_by_side(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_py(["hydra/launcher=parallel", "logger=none", "train.max_steps=2", "seed=0,1"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = job_summaries(sweep)
    assert len(summaries) == 2 and all(s["outcome"] == "completed" for s in summaries.values())
