"""Data parallel through torchrun (gloo on CPU), preemption and crash safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minilm import checkpoint
from minilm.errors import EXIT_INTERRUPTED
from minilm.rundir import read_metrics
from tests.helpers import losses, run_training, train_command

pytestmark = pytest.mark.slow  # real runs in subprocesses: signals, torchrun, sweeps


def wait_for(predicate, timeout=120.0, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited early with {process.returncode}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(losses(read_metrics(run_dir))) if path.exists() else 0


# With CUDA, device=auto puts rank r on cuda:r (NCCL): a machine with one GPU has no cuda:1.
@pytest.mark.skipif(torch.cuda.device_count() == 1,
                    reason="two ranks on CUDA need two GPUs (machines without CUDA run it on gloo)")
@pytest.mark.parametrize("arm", [["optim=adamw"], ["model=modern", "model.attn_softcap=30", "model.n_kv_head=1",
                                           "optim=muon"]], ids=["gpt2_adamw", "modern_muon"])
def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(arm, tmp_path):
    common = ["deterministic=true", "train.max_steps=6", "train.eval_interval=3", *arm]
    single = run_training(common + ["train.batch_size=8"], tmp_path / "single")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # eval_batches=4 x batch 4 covers the same 16 validation windows as 2 x 8
    result = subprocess.run(train_command(common + ["train.batch_size=4", "train.eval_batches=4"], tmp_path / "ddp",
                                          torchrun),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    # The same windows in the same order, averaged in a different order: fp32 rounding only.
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    val = [r["val/loss"] for r in ddp if "val/loss" in r]
    assert val == pytest.approx([r["val/loss"] for r in single if "val/loss" in r], rel=1e-5)
    assert json.loads((tmp_path / "ddp" / "environment.json").read_text())["world_size"] == 2
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").exists()


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(["train.max_steps=4000", "train.ckpt_interval=0", "logger=wandb",
                             "logger.mode=offline"], run_dir)
    seen = []
    for _ in range(2):  # preempted twice, each time resuming where it stopped
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = logged_steps(run_dir) + 5
        wait_for(lambda target=target: logged_steps(run_dir) >= target, process=process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        seen.append((state["step"], state["wandb_id"]))
        steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
        assert steps == list(range(1, state["step"] + 1))  # contiguous, no step logged twice
    (first_step, first_id), (second_step, second_id) = seen
    assert second_step > first_step >= 5
    assert first_id == second_id  # the same W&B run continues
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "interrupted" and summary["stopped_by"] == "SIGTERM"


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(["train.max_steps=4000", "train.ckpt_interval=1"], run_dir)
    last_step = 0
    for delay in (0.0, 0.13, 0.31):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = last_step + 3
        wait_for(lambda target=target: logged_steps(run_dir) >= target, process=process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        state = checkpoint.load(run_dir / "checkpoints" / "last.pt")  # loads: never half-written
        assert state["step"] >= last_step
        last_step = state["step"]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name not in ("last.pt", "previous.pt")]
    assert all(name.endswith(".tmp") for name in leftovers)
    # previous.pt is the checkpoint before last.pt, or the same one when the kill fell between making it
    # (a link to the old last.pt) and replacing last.pt
    assert checkpoint.load(run_dir / "checkpoints" / "previous.pt")["step"] <= last_step


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_also_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(["train.max_steps=4000", "train.ckpt_interval=0"], run_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: logged_steps(run_dir) >= 2, process=process)
    os.kill(process.pid, signal.SIGUSR1)
    assert process.wait(timeout=120) == EXIT_INTERRUPTED
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] >= 2


@pytest.mark.parametrize("norm", ["layernorm", "triton_rmsnorm", "dyt", "triton_dyt"])
def test_compiled_model_trains_like_eager(norm, tmp_path):
    # aot_eager runs dynamo + AOT autograd (the custom ops' fake kernels included) without
    # inductor's C++ code generation, which takes minutes on 2 CPU cores.
    common = ["train.max_steps=2", "deterministic=true", f"norm={norm}", "model.n_layer=1"]
    eager = losses(run_training(common, tmp_path / "eager"))
    compiled = losses(run_training(common + ["train.compile=true", "train.compile_backend=aot_eager"],
                                   tmp_path / "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-5)
