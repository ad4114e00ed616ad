"""report.py's statistics on hand-made runs: confidence intervals, arms, LR sensitivity."""

import math

import pytest
import scipy.stats

from minilm import report
from minilm.runs import RunRecord


@pytest.mark.parametrize("dof", [1, 2, 5, 10, 29, 30, 31, 45, 120, 1000])
def test_t_quantile_matches_scipy(dof):
    assert report.t_critical(dof) == pytest.approx(scipy.stats.t.ppf(0.975, dof), abs=2e-3)


def test_mean_ci():
    assert report.mean_ci([]) == (None, None) and report.mean_ci([2.0]) == (2.0, None)
    mean, half = report.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def config(precision="fp32", lr=1e-3, seed=0, qk_norm=False):
    precision_cfg = {"name": precision, "tf32": False}
    if precision == "fp16":
        precision_cfg["init_scale"] = 65536.0
    return {"seed": seed, "precision": precision_cfg, "optim": {"lr": lr, "warmup_steps": 50},
            "model": {"n_layer": 2, "qk_norm": qk_norm}}


def test_swept_keys_leave_out_seed_constants_and_keys_another_key_determines():
    configs = [config(p, seed=s) for p in ("fp32", "fp16", "bf16") for s in (0, 1)]
    assert report.swept_keys(configs) == ["precision.name"]  # not precision.init_scale, not seed
    grid = [config(lr=lr, qk_norm=q) for lr in (1e-3, 1e-2) for q in (False, True)]
    assert report.swept_keys(grid) == ["optim.lr", "model.qk_norm"]


def run(final: float | None, lr: float, qk_norm: bool, seed: int = 0, init: float = 7.0) -> RunRecord:
    rows = [{"step": 1, "train/loss": init}, {"step": 2, "train/loss": 5.0 if final else "nan"}]
    if final is not None:
        rows.append({"step": 2, "val/loss": final})
    return RunRecord(f"run-{lr}-{qk_norm}-{seed}", config(lr=lr, seed=seed, qk_norm=qk_norm), rows=rows,
                     summary={"diverged": final is None, "diverged_at_step": None if final else 2})


def test_lr_sensitivity_counts_a_diverged_run_as_its_loss_at_init():
    runs = [run(5.0, 1e-3, False), run(4.0, 1e-2, False), run(None, 1e-1, False),
            run(5.0, 1e-3, True), run(4.0, 1e-2, True, seed=0), run(4.4, 1e-2, True, seed=1), run(4.5, 1e-1, True)]
    stats = [report.run_stats(r) for r in runs]
    keys = report.swept_keys([r.config for r in runs])
    arms = report.group_arms(stats, keys)
    result = report.lr_sensitivity(arms, keys)
    lrs, losses, score = result["model.qk_norm=False"]
    assert lrs == [1e-3, 1e-2, 1e-1] and losses == [5.0, 4.0, 7.0]  # the diverged run counts as 7.0
    assert score == pytest.approx(((5 - 4) + 0 + (7 - 4)) / 3)
    lrs, losses, score = result["model.qk_norm=True"]
    assert losses == pytest.approx([5.0, 4.2, 4.5])  # seeds averaged per grid point
    assert score == pytest.approx(((5 - 4.2) + 0 + (4.5 - 4.2)) / 3)
    rows = {r["arm"]: r for r in (report.arm_row(report.arm_label(a, keys), rs) for a, rs in arms.items())}
    diverged = rows["optim.lr=0.1, model.qk_norm=False"]
    assert diverged["diverged"] == 1 and diverged["final_val_mean"] is None and diverged["median_divergence_step"] == 2


def test_a_run_that_spiked_past_the_divergence_line_and_went_on_keeps_its_final_loss():
    record = RunRecord("spiky", config(), rows=[{"step": 1, "train/loss": 7.0}, {"step": 2, "train/loss": 9.0},
                                                {"step": 3, "train/loss": 5.0}, {"step": 3, "val/loss": 5.1}],
                       summary={"outcome": "completed", "diverged": True, "diverged_at_step": 2})
    stats = report.run_stats(record)
    assert stats.diverged and stats.diverged_at == 2 and stats.final_val == 5.1
    stopped = RunRecord("stopped", config(), rows=record.rows, summary={**record.summary, "outcome": "diverged"})
    assert report.run_stats(stopped).final_val is None
