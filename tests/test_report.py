"""report.py and studies.py on hand-made runs: statistics, arms, LR sensitivity, figures, verdicts."""

import csv
import json
import math

import pytest
import scipy.stats

from minilm.analysis import figures, report, sweep
from minilm.analysis.runs import RunRecord
from minilm.train.divergence import DivergenceMonitor


@pytest.mark.parametrize("dof", [1, 2, 5, 10, 29, 30, 31, 45, 120, 1000])
def test_t_quantile_matches_scipy(dof):
    assert sweep.t_critical(dof) == pytest.approx(scipy.stats.t.ppf(0.975, dof), abs=2e-3)


def test_mean_ci():
    assert sweep.mean_ci([]) == (None, None) and sweep.mean_ci([2.0]) == (2.0, None)
    mean, half = sweep.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def config(precision="fp32", lr=1e-3, seed=0, qk_norm=False):
    precision_cfg = {"name": precision, "tf32": False}
    if precision == "fp16":
        precision_cfg["init_scale"] = 65536.0
    return {"seed": seed, "precision": precision_cfg, "optim": {"lr": lr, "warmup_steps": 50},
            "model": {"n_layer": 2, "qk_norm": qk_norm}}


def test_swept_keys_leave_out_seed_constants_and_keys_another_key_determines():
    configs = [config(p, seed=s) for p in ("fp32", "fp16", "bf16") for s in (0, 1)]
    assert sweep.swept_keys(configs) == ["precision.name"]  # not precision.init_scale, not seed
    grid = [config(lr=lr, qk_norm=q) for lr in (1e-3, 1e-2) for q in (False, True)]
    assert sweep.swept_keys(grid) == ["optim.lr", "model.qk_norm"]


def run(final: float | None, lr: float, qk_norm: bool, seed: int = 0, init: float = 7.0) -> RunRecord:
    rows = [{"step": 1, "train/loss": init}, {"step": 2, "train/loss": 5.0 if final else "nan"}]
    if final is not None:
        rows.append({"step": 2, "val/loss": final})
    return RunRecord(f"run-{lr}-{qk_norm}-{seed}", config(lr=lr, seed=seed, qk_norm=qk_norm), rows=rows,
                     summary={"diverged": final is None, "diverged_at_step": None if final else 2})


def test_lr_sensitivity_counts_a_diverged_run_as_its_loss_at_init():
    runs = [run(5.0, 1e-3, False), run(4.0, 1e-2, False), run(None, 1e-1, False),
            run(5.0, 1e-3, True), run(4.0, 1e-2, True, seed=0), run(4.4, 1e-2, True, seed=1), run(4.5, 1e-1, True)]
    stats = [sweep.run_stats(r) for r in runs]
    keys = sweep.swept_keys([r.config for r in runs])
    arms = sweep.group_arms(stats, keys)
    result = sweep.lr_sensitivity(arms, keys)
    lrs, losses, score = result["model.qk_norm=False"]
    assert lrs == [1e-3, 1e-2, 1e-1] and losses == [5.0, 4.0, 7.0]  # the diverged run counts as 7.0
    assert score == pytest.approx(((5 - 4) + 0 + (7 - 4)) / 3)
    lrs, losses, score = result["model.qk_norm=True"]
    assert losses == pytest.approx([5.0, 4.2, 4.5])  # seeds averaged per grid point
    assert score == pytest.approx(((5 - 4.2) + 0 + (4.5 - 4.2)) / 3)
    rows = {r["arm"]: r for r in (sweep.arm_row(sweep.arm_label(a, keys), rs) for a, rs in arms.items())}
    diverged = rows["optim.lr=0.1, model.qk_norm=False"]
    assert diverged["diverged"] == 1 and diverged["final_val_mean"] is None and diverged["median_divergence_step"] == 2


def test_a_run_that_spiked_past_the_divergence_line_and_went_on_keeps_its_final_loss():
    record = RunRecord("spiky", config(), rows=[{"step": 1, "train/loss": 7.0}, {"step": 2, "train/loss": 9.0},
                                                {"step": 3, "train/loss": 5.0}, {"step": 3, "val/loss": 5.1}],
                       summary={"outcome": "completed", "diverged": True, "diverged_at_step": 2})
    stats = sweep.run_stats(record)
    assert stats.diverged and stats.diverged_at == 2 and stats.final_val == 5.1
    stopped = RunRecord("stopped", config(), rows=record.rows, summary={**record.summary, "outcome": "diverged"})
    assert sweep.run_stats(stopped).final_val is None


def test_swept_keys_keep_a_key_another_group_happens_to_determine():
    # a folder mixing two sweeps: each precision ran at its own LR; both keys still name the arms
    mixed = [config("fp32", lr=1e-3), config("bf16", lr=1e-2), config("fp32", lr=1e-3, seed=1)]
    assert sweep.swept_keys(mixed) == ["precision.name", "optim.lr"]


# ---------------------------------------------------------------- the report over hand-made runs


def nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def hand_made_run(study: dict, steps: int = 20, diverged_at: int | None = None, init: float = 7.0,
                  logit_growth: float = 1.0, **values) -> RunRecord:
    """A run of `steps` steps whose loss falls from `init` (stopping at `diverged_at`), with attention logits
    sampled every 10 steps and, under `values`, its swept config values (dotted keys with __ for dots)."""
    flat = {"seed": 0, "model.n_layer": 2, "model.qk_norm": False, "optim.lr": 1e-3,
            **{k.replace("__", "."): v for k, v in values.items()}}
    last = diverged_at or steps
    rows = [{"step": s, "train/loss": init - 2 * s / steps} for s in range(1, last + 1)]
    for row in rows:
        if row["step"] == 1 or row["step"] % 10 == 0:
            row.update({f"diag/attn_logit_max/L{i}": 1.0 + logit_growth * row["step"] for i in range(2)})
    if diverged_at is None:
        rows.append({"step": last, "val/loss": rows[-1]["train/loss"]})
    summary = {"outcome": "diverged" if diverged_at else "completed", "diverged": bool(diverged_at),
               "diverged_at_step": diverged_at, "spikes": [], "divergence_line": 7.4}
    return RunRecord(f"run-{sorted(flat.items())}", {**nested(flat), "study": study}, rows=rows, summary=summary)


def test_the_report_draws_exactly_the_declared_figures_that_have_data(tmp_path):
    study = {"name": None, "figures": ["loss_curves", "logz", "attn_logit_max", "final_loss_vs_lr"],
             "panel": "optim.lr", "expected": "the expected outcome, in words", "source": "a paper"}
    runs = [hand_made_run(study, optim__lr=lr, model__qk_norm=qk, seed=seed)
            for lr in (1e-3, 1e-2) for qk in (False, True) for seed in (0, 1)]
    (tmp_path / "stale.png").write_bytes(b"an earlier report's figure")
    text = report.write_report(runs, "hand-made", tmp_path)
    drawn = {p.name for p in tmp_path.glob("*.png")}
    assert drawn == {"loss_curves.png", "attn_logit_max.png", "final_loss_vs_lr.png"}  # logz: nothing logged it
    assert "Not drawn, no data in these runs: logz" in text
    assert all(f"]({name})" in text for name in drawn)  # every figure is linked
    assert text.index("the expected outcome, in words") < text.index("## Arms")  # the report opens with it


def test_a_coordinate_check_kept_in_the_sweep_dir_joins_the_report(tmp_path):
    from minilm.launch import coordcheck

    source, out = tmp_path / "sweep", tmp_path / "report"
    widths, rms = [64, 128], {"embedding": [[1.0, 1.0]], "L0.attn": [[1.0, 2.0]], "L0.mlp": [[1.0, 1.0]],
                              "L0.residual": [[1.0, 1.0]], "logits": [[1.0, 4.0]]}
    record = {"overrides": ["model.parametrization=sp"], "parametrization": "sp", "optimizer": "adamw", "lr": 8e-3,
              "widths": widths, "steps": 1, "rms": rms,
              "slope": {name: [coordcheck.slope(widths, values[0])] for name, values in rms.items()}}
    (source / "coordcheck_sp").mkdir(parents=True)
    (source / "coordcheck_sp" / "coordcheck.json").write_text(json.dumps(record))
    coordcheck.plot(record, source / "coordcheck_sp" / "coordcheck.png")
    runs = [hand_made_run({"figures": ["loss_curves"]}, optim__lr=lr) for lr in (1e-3, 1e-2)]
    text = report.write_report(runs, str(source), out)
    assert "](coordcheck_sp.png)" in text and (out / "coordcheck_sp.png").stat().st_size > 0
    assert "block outputs +0.00 to +1.00, logits +2.00" in text
    assert text.index("Coordinate check") < text.index("## Arms")
    assert "Coordinate check" not in report.write_report(runs, "hand-made", tmp_path / "plain")  # none kept: none shown


def test_a_one_step_study_reports_no_divergence_and_draws_no_loss_curve(tmp_path):
    monitor = DivergenceMonitor(threshold=7.4, window=50)
    monitor.update(1, 7.9)  # above the line at init: a one-step run cannot stay above it for the window
    study = {"name": "grad_norm_init", "figures": ["loss_curves", "grad_norm_by_layer"], "panel": "model.n_layer"}
    runs = []
    for placement in ("pre", "post"):
        record = hand_made_run(study, steps=1, model__placement=placement)
        record.rows[0].update({f"diag/grad_rms/L{i}.{part}": 0.1 for i in range(2) for part in ("attn", "mlp")})
        record.summary.update(monitor.summary(last_step=1))
        runs.append(record)
    text = report.write_report(runs, "one step", tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"grad_norm_by_layer.png"}
    with open(tmp_path / "arms.csv") as f:
        arms = list(csv.DictReader(f))
    assert [a["diverged"] for a in arms] == ["0", "0"] and [a["spiked"] for a in arms] == ["0", "0"]
    assert "✔ a one-step study reports no divergence: 0/2 runs diverged" in text
    assert "shorter than the window, so no divergence" in text


def lr_qknorm_runs(stable_qk_norm: bool) -> list[RunRecord]:
    """Runs where the arm `model.qk_norm=stable_qk_norm` trains at every LR and the other diverges at the top one."""
    study = {"name": "lr_qknorm", "figures": [], "panel": "optim.lr"}
    return [hand_made_run(study, optim__lr=lr, model__qk_norm=qk,
                          diverged_at=15 if (lr == 1e-1 and qk != stable_qk_norm) else None,
                          logit_growth=lr * (1 if qk else 100))
            for lr in (1e-3, 1e-2, 1e-1) for qk in (False, True)]


@pytest.mark.parametrize("stable_qk_norm", [True, False])
def test_verdicts_are_computed_from_the_data(stable_qk_norm):
    from minilm.analysis.studies import verdicts

    runs = lr_qknorm_runs(stable_qk_norm)
    swept = sweep.Sweep([sweep.run_stats(r) for r in runs], sweep.swept_keys([r.config for r in runs]))
    found = {v.claim: v for v in verdicts("lr_qknorm", swept)}
    sensitivity = found["qk-norm lowers the LR sensitivity"]
    assert sensitivity.passed is stable_qk_norm  # flipping which arm diverges flips the verdict
    without, with_qk = sensitivity.numbers["without"], sensitivity.numbers["with"]
    assert (with_qk < without) is stable_qk_norm
    assert sensitivity.measured == f"{without:.2f} → {with_qk:.2f} — single-seed observation"  # one seed per arm
    top_lr = "the highest learning rate diverges or ends far above the best loss without qk-norm, and trains with it"
    assert found[top_lr].passed is stable_qk_norm
    assert found["without qk-norm the max attention logit grows with the learning rate"].passed  # logits: lr x 100
    assert found["with qk-norm the attention logits stay bounded"].passed


def test_a_verdict_without_the_runs_it_needs_says_so():
    from minilm.analysis.studies import verdicts

    runs = [r for r in lr_qknorm_runs(True) if not r.config["model"]["qk_norm"]]  # the qk-norm arm is missing
    swept = sweep.Sweep([sweep.run_stats(r) for r in runs], sweep.swept_keys([r.config for r in runs]))
    found = {v.claim: v for v in verdicts("lr_qknorm", swept)}
    assert found["qk-norm lowers the LR sensitivity"].passed is None
    assert "not measured" in found["qk-norm lowers the LR sensitivity"].measured


def test_n_counts_the_seeds_behind_each_point():
    steps = [1, 2, 3, 4, 5]
    assert figures.n_label(steps, [dict.fromkeys(steps, 1.0)] * 3) == "n=3"
    stopped = {1: 1.0, 2: 1.0, 3: 1.0}  # a run that stopped after step 3
    assert figures.n_label(steps, [dict.fromkeys(steps, 1.0), stopped]) == "n=2→1 from step 4"
    assert figures.n_label(steps, [dict.fromkeys(steps, 1.0)]) == "n=1"


def test_a_cut_off_metrics_file_is_read_with_a_warning_naming_its_line(tmp_path, caplog):
    import json

    import yaml

    from minilm.analysis.runs import load_run_dir
    from minilm.launch.cli import compose
    from minilm.train.lifecycle import plain
    from tests.helpers import with_tiny

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain(compose(with_tiny(["train.max_steps=3"])))))
    rows = [{"step": s, "train/loss": 6.0 - s} for s in (1, 2, 3)] + [{"step": 3, "val/loss": 2.5}]
    lines = [json.dumps(row) for row in rows]
    lines[1] = lines[1][:9]  # a damaged line in the middle
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines)[:-5])  # and a last line cut short
    with caplog.at_level("WARNING", logger="minilm"):
        record = load_run_dir(tmp_path)
    assert record.rows == [rows[0], rows[2]]  # the good rows kept
    path = tmp_path / "metrics.jsonl"
    assert [r.getMessage().split(" is not")[0] for r in caplog.records] == [f"{path} line 2", f"{path} line 4"]
