"""The training core end to end on CPU: every precision and placement, determinism, resume."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from minilm import checkpoint
from minilm.data import TokenWindowSampler
from minilm.launch.cli import compose
from minilm.optim import build_optimizer
from minilm.precision.policy import Precision
from tests.helpers import fit_alone, losses, make_run, run_training

PRECISIONS = ["fp32", "fp16", "bf16", "bf16_pure", "bf16_pure_nearest", "bf16_pure_kahan", "fp8", "fp8_rowwise"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "dyt"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_one_step_gives_finite_loss_and_updates_every_parameter(placement, norm, precision, tmp_path):
    trainer = make_run([f"model.placement={placement}", f"norm={norm}", f"precision={precision}",
                            "optim.warmup_steps=0", "optim.lr=1e-2"], tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss, grad_norm, _ = trainer.train_step()
    assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
    weights = torch.bfloat16 if precision.startswith("bf16_pure") else torch.float32  # no fp32 master copy
    for name, param in trainer.model.named_parameters():
        assert param.dtype == weights, name
        assert not torch.equal(param, before[name]), f"{name} was not updated"
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == weights


@pytest.mark.slow
def test_loss_falls_substantially_on_the_embedded_corpus(tmp_path):
    rows = run_training(["train.max_steps=200", "optim.warmup_steps=10", "train.eval_interval=200",
                         "model.d_model=128", "model.n_head=4", "model.block_size=64", "train.batch_size=16"],
                        tmp_path)
    train_losses = losses(rows)
    start, end = sum(train_losses[:5]) / 5, sum(train_losses[-10:]) / 10
    assert start > 6.0 and end < start - 2.0, (start, end)  # ln(512) = 6.24 at init
    val = [row["val/loss"] for row in rows if "val/loss" in row]
    assert val and val[-1] < start - 1.5


@pytest.mark.slow
def test_deterministic_runs_are_bitwise_equal(tmp_path):
    overrides = ["deterministic=true", "train.max_steps=8", "model.dropout=0.1"]
    first = losses(run_training(overrides, tmp_path / "a"))
    second = losses(run_training(overrides, tmp_path / "b"))
    assert len(first) == 8 and first == second
    third = losses(run_training(overrides + ["seed=1"], tmp_path / "c"))
    assert third != first  # the seed really drives init and data order


SKIP_SPIKES = ["optim.skip_spikes=true", "optim.skip_spikes_window=20", "optim.skip_spikes_sigma=1"]


@pytest.mark.slow
@pytest.mark.parametrize("precision,arm", [("fp32", []), ("fp16", []), ("bf16_pure", []), ("bf16_pure", ["norm=dyt"]),
                                           ("fp32", ["optim=muon"]), ("fp16", ["optim=muon"]),
                                           ("fp32", ["optim=muon", *SKIP_SPIKES]),
                                           ("fp32", ["optim=muon", "optim.qk_clip_tau=0.1"])])
def test_resume_equals_uninterrupted(precision, arm, tmp_path):
    skip = SKIP_SPIKES[0] in arm
    # skip-step decides from step 20 on (OLMo-core's minimum history): split after it, at sigma 1 some skip
    steps, split = (26, 22) if skip else (10, 6)
    common = ["deterministic=true", "optim.warmup_steps=0", "model.dropout=0.1", f"precision={precision}",
              f"train.max_steps={steps}", "train.grad_accum=2", *arm]
    full = run_training(common, tmp_path / "full")
    # stop after `split` steps with a checkpoint (as a preemption does), then resume in the same run dir
    trainer = make_run(common, tmp_path / "split")
    fit_alone(trainer, until_step=split)
    trainer.save_checkpoint()
    trainer.close()
    rows = run_training(common + ["train.ckpt_interval=0"], tmp_path / "split")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))
    assert losses(rows) == losses(full)
    if skip:  # steps were skipped after the split, so the resumed history decided them
        counts = [r["optim/skipped_spikes"] for r in full if "optim/skipped_spikes" in r]
        assert counts[-1] > counts[split - 1] and counts == [r["optim/skipped_spikes"] for r in rows
                                                             if "optim/skipped_spikes" in r]
    if "optim.qk_clip_tau=0.1" in arm:  # heads were clipped after the split, as in the run uninterrupted
        clips = [r.get("optim/qk_clipped_heads") for r in full if "train/loss" in r]
        assert sum(clips[split:]) > 0 and clips == [r.get("optim/qk_clipped_heads") for r in rows if "train/loss" in r]


def test_fp16_scaler_skips_an_injected_inf_and_recovers(tmp_path):
    trainer = make_run(["precision=fp16", "optim.warmup_steps=0", "train.max_steps=4"], tmp_path)
    weight = trainer.model.blocks[0].mlp.fc.weight
    calls = {"n": 0}

    def poison_second_step(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(poison_second_step)
    scale = trainer.precision.scale()
    trainer.train_step()
    snapshot = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _, grad_norm, _ = trainer.train_step()  # the poisoned step
    assert not math.isfinite(grad_norm.item())
    assert all(torch.equal(p, snapshot[n]) for n, p in trainer.model.named_parameters()), "inf step was applied"
    assert trainer.precision.scale() == scale / 2  # backed off
    loss, grad_norm, _ = trainer.train_step()  # recovers
    assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
    assert not torch.equal(weight, snapshot["blocks.0.mlp.fc.weight"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_gradient_never_reaches_weights_without_scaler(precision, tmp_path):
    trainer = make_run([f"precision={precision}", "optim.warmup_steps=0"], tmp_path)
    trainer.model.blocks[0].attn.qkv.weight.register_hook(lambda g: g * float("nan"))
    snapshot = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    assert all(torch.equal(p, snapshot[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_with_a_record(tmp_path):
    trainer = make_run(["train.max_steps=20", "train.log_interval=5"], tmp_path)
    trainer.model.blocks[0].mlp.fc.weight.data[0, 0] = float("inf")  # poison: the forward turns nan
    summary = fit_alone(trainer)
    trainer.close()
    assert summary["diverged"] and summary["diverged_at_step"] == 1 and summary["outcome"] == "diverged"
    assert summary["step"] == 1  # stopped at the step it happened, not at the next metrics flush
    assert json.loads((tmp_path / "summary.json").read_text())["diverged_at_step"] == 1
    assert checkpoint.load(tmp_path / "checkpoints" / "diverged.pt")["step"] == 1


@pytest.mark.slow
def test_run_dir_holds_metrics_config_and_environment(tmp_path):
    rows = run_training(["train.max_steps=4", "train.eval_interval=2", "train.log_interval=2"], tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"optim/grad_norm", "optim/lr"} <= set(r) for r in train_rows)
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["packages"]["torch"] and env["data_fingerprint"] and "git" in env and env["device"] == "cpu"
    assert "model:" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_detect_anomaly_mode_trains(tmp_path):
    rows = run_training(["detect_anomaly=true", "train.max_steps=2"], tmp_path)
    assert len(losses(rows)) == 2


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
    run_training(["train.max_steps=3", "train.eval_interval=0"], tmp_path)
    first = json.loads((tmp_path / "summary.json").read_text())
    rows = run_training(["train.max_steps=3", "train.eval_interval=0"], tmp_path)  # e.g. a resubmitted sweep
    second = json.loads((tmp_path / "summary.json").read_text())
    assert first["val/loss"] is not None and second["val/loss"] == first["val/loss"]
    assert second["last_healthy/step"] == 3 and second["outcome"] == "completed"
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16_pure", "bf16_pure_kahan", "fp8", "fp8_rowwise"])
def test_the_new_precisions_train(precision, tmp_path):
    rows = run_training([f"precision={precision}", "train.max_steps=40", "optim.lr=1e-2", "optim.warmup_steps=5",
                         "train.eval_interval=0"], tmp_path)
    train_losses = losses(rows)
    assert all(math.isfinite(loss) for loss in train_losses)
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.3
    env = json.loads((tmp_path / "environment.json").read_text())
    assert ("emulated (cpu)" in env["precision"]) == precision.startswith("fp8")
    bytes_per_param = rows[0]["mem/bytes_per_param"]
    assert bytes_per_param == {"bf16_pure": 8, "bf16_pure_kahan": 10}.get(precision, 16)


@pytest.mark.slow
def test_stochastic_rounding_runs_are_bitwise_reproducible(tmp_path):
    common = ["precision=bf16_pure", "deterministic=true", "train.max_steps=6", "model.dropout=0.1"]
    first = losses(run_training(common, tmp_path / "a"))
    assert first == losses(run_training(common, tmp_path / "b"))
    assert first != losses(run_training([*common, "seed=1"], tmp_path / "c"))
@pytest.mark.parametrize("independent", [False, True])
def test_weight_decay_is_coupled_to_the_learning_rate_or_independent_of_it(independent):
    decay = {}
    for lr in (1e-3, 1e-2):
        cfg = compose([f"optim.lr={lr}", f"optim.independent_weight_decay={independent}", "optim.weight_decay=0.01"])
        layer = torch.nn.Linear(8, 8)
        precision = Precision(OmegaConf.to_object(cfg.precision), torch.device("cpu"))
        optimizer = build_optimizer(layer, cfg.optim, precision, 0)
        before = layer.weight.detach().clone()
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)  # AdamW's step is then the decay alone: w <- w (1 - lr x weight_decay)
        optimizer.step()
        decay[lr] = 1 - (layer.weight.detach() / before).mean().item()
    if independent:  # the same per-step decay at any peak LR: weight_decay itself
        assert decay[1e-3] == pytest.approx(0.01, rel=1e-4) and decay[1e-2] == pytest.approx(0.01, rel=1e-4)
    else:  # AdamW's: lr x weight_decay
        assert decay[1e-3] == pytest.approx(1e-5, rel=0.02) and decay[1e-2] == pytest.approx(1e-4, rel=0.02)


def test_deterministic_mode_follows_the_config_both_ways():
    """deterministic=true turns on torch's deterministic algorithms (Inductor's too) and cuDNN's; false turns
    them off again (the call is skipped only when nothing would change)."""
    import torch._inductor.config as inductor_config

    from minilm.seeding import set_deterministic

    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and inductor_config.deterministic
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not inductor_config.deterministic
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


@pytest.mark.parametrize("seed", [1_764_770_000_123_456_789, 2**70 + 5])  # `seed=$(date +%s%N)`, and beyond 64 bits
def test_any_seed_the_schema_allows_trains_and_samples(seed, tmp_path):
    trainer = make_run([f"seed={seed}", "train.max_steps=2", "train.sample_tokens=3",
                            "precision=bf16_pure"], tmp_path)  # bf16_pure: its stochastic rounding is seeded too
    summary = fit_alone(trainer)
    trainer.close()
    assert summary["outcome"] == "completed" and summary["sample"].startswith("def")
    tokens = trainer.data.train
    small = TokenWindowSampler(tokens, 16, 4, seed % 2**64)
    huge = TokenWindowSampler(tokens, 16, 4, seed)  # beyond torch's 64 bits: the same stream as modulo 2**64
    assert torch.equal(small.next_batch()[0], huge.next_batch()[0])
    assert not torch.equal(TokenWindowSampler(tokens, 16, 4, 7).next_batch()[0],
                           TokenWindowSampler(tokens, 16, 4, 8).next_batch()[0])
