"""Anomaly forensics: a planted inf is caught, attributed to its layer, bundled and replayed."""

import subprocess
import sys

import pytest
import torch

from minilm import checkpoint
from minilm.launch.replay import main as replay_main
from minilm.rundir import read_metrics
from minilm.seeding import torch_rng_state
from tests.helpers import ROOT, fit_alone, losses, make_run, peek_batch

REPLAY = ROOT / "scripts" / "replay.py"
PLANTED = "blocks.1.mlp.fc"


@pytest.mark.slow
@pytest.mark.parametrize("precision, activation_hooks", [("fp32", False), ("fp16", True)])
def test_planted_inf_is_caught_attributed_and_replayed(precision, activation_hooks, tmp_path, capsys):
    # log_interval=5: the step is checked during the next step, not at a metrics flush
    trainer = make_run([f"precision={precision}", f"diagnostics.activation_hooks={activation_hooks}",
                            "train.max_steps=6", "train.log_interval=5"], tmp_path)
    trainer.train_step()
    trainer.train_step()
    trainer.model.get_submodule(PLANTED).weight.data[3, 7] = float("inf")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch, rng, scale = peek_batch(trainer), torch_rng_state(), trainer.precision.scale()
    summary = fit_alone(trainer)

    assert summary["diverged_at_step"] == 3 and summary["forensics/step"] == 3
    assert summary["forensics/first_nonfinite_module"] == PLANTED
    assert summary["forensics/first_nonfinite_param"] == f"{PLANTED}.weight"
    bundle_path = tmp_path / "forensics" / "step_000003.pt"
    assert summary["forensics/bundle"] == str(bundle_path)
    bundle = checkpoint.load(bundle_path)
    assert bundle["first_nonfinite_module"] == PLANTED and bundle["replay_reproduced"] and bundle["pre_step_weights"]
    assert bundle["live_first_nonfinite_module"] == (PLANTED if activation_hooks else None)
    # the state from just before the step: weights, batch, RNG, loss scale (fp16 has since backed off)
    assert all(torch.equal(bundle["model"][k], v) for k, v in weights.items())
    assert all(torch.equal(a, b) for a, b in zip(bundle["batches"][0], batch))
    assert torch.equal(bundle["rng"]["torch"], rng["torch"])
    if precision == "fp16":
        assert bundle["scaler"]["scale"] == scale and trainer.precision.scale() < scale
    assert bundle["optimizer"]["state"][0]["step"] == 2

    capsys.readouterr()
    assert replay_main([str(bundle_path)]) == 0
    out = capsys.readouterr().out
    assert f"first non-finite module output (forward): {PLANTED}" in out
    assert "returned nan values" in out and "reproduced: yes" in out


@pytest.mark.slow
def test_replay_command_exits_0_when_reproduced_and_1_when_clean(tmp_path, capsys):
    trainer = make_run(["train.max_steps=3", "train.log_interval=3"], tmp_path)
    trainer.train_step()
    trainer.model.get_submodule(PLANTED).weight.data[0, 0] = float("nan")
    fit_alone(trainer)
    bundle_path = tmp_path / "forensics" / "step_000002.pt"
    result = subprocess.run([sys.executable, str(REPLAY), str(bundle_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "reproduced: yes" in result.stdout, result.stdout + result.stderr
    bundle = checkpoint.load(bundle_path)
    bundle["model"][f"{PLANTED}.weight"][0, 0] = 0.0  # repaired: the same step now runs clean
    checkpoint.save_atomic(bundle, bundle_path)
    assert replay_main([str(bundle_path)]) == 1
    assert "reproduced: no" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_gradient_alone_is_bundled_except_as_fp16_overflow(precision, tmp_path):
    trainer = make_run([f"precision={precision}", "train.max_steps=3"], tmp_path)
    calls = {"n": 0}

    def poison_second_step(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    trainer.model.blocks[0].attn.qkv.weight.register_hook(poison_second_step)
    summary = fit_alone(trainer)
    assert not summary["diverged"] and len(losses(read_metrics(tmp_path))) == 3  # finite loss: training goes on
    assert summary["optim/skipped_updates"] == 1  # the guard skipped it, in every precision
    if precision == "fp32":
        assert summary["forensics/step"] == 2 and (tmp_path / "forensics" / "step_000002.pt").exists()
    else:  # non-finite scaled gradients are the loss scaler's routine: skipped and counted, no bundle
        assert "forensics/step" not in summary and summary["amp/skipped_steps"] == 1


def test_forensics_off_writes_nothing(tmp_path):
    trainer = make_run(["diagnostics=off", "train.max_steps=2"], tmp_path)
    trainer.model.get_submodule(PLANTED).weight.data[0, 0] = float("inf")
    summary = fit_alone(trainer)
    assert summary["diverged"] and "forensics/step" not in summary and not (tmp_path / "forensics").exists()
