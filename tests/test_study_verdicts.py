"""The verdicts of the newer studies and the seed rule, on synthetic runs: each flips when the data does."""

import math

import pytest

from minilm.analysis import figures, sweep
from minilm.analysis.runs import RunRecord
from minilm.analysis.studies import common, verdicts
from tests.test_report import nested

SEEDS = (0, 1, 2)


def synthetic_run(study: str, final: float | None, seed: int = 0, n_layer: int = 2, steps: int = 10,
                  at_end: dict | None = None, series: dict | None = None, summary: dict | None = None,
                  **values) -> RunRecord:
    """A run whose loss falls from 7 to `final` (None: diverged at the last step) over `steps` steps; `at_end`
    {prefix: [value per layer]} logged at the last step; `series` {metric: {step: value}}; config `values`
    written with __ for dots."""
    flat = {"seed": seed, "model.n_layer": n_layer, **{k.replace("__", "."): v for k, v in values.items()}}
    end = 5.0 if final is None else final
    rows = [{"step": s, "train/loss": 7.0 - (7.0 - end) * s / steps} for s in range(1, steps + 1)]
    if final is None:
        rows[-1]["train/loss"] = math.nan
    else:
        rows.append({"step": steps, "val/loss": final})
    for prefix, per_layer in (at_end or {}).items():
        rows[-1].update({f"{prefix}/L{i}": v for i, v in enumerate(per_layer)})
    for metric, points in (series or {}).items():
        for step, value in points.items():
            rows[step - 1][metric] = value
    return RunRecord(f"run-{sorted(flat.items())}", {**nested(flat), "study": {"name": study}}, rows=rows,
                     summary={"outcome": "diverged" if final is None else "completed", "diverged": final is None,
                              "spikes": [], **(summary or {})})


def judged(study: str, runs: list[RunRecord]) -> dict[str, common.Verdict]:
    swept = sweep.Sweep([sweep.run_stats(r) for r in runs], sweep.swept_keys([r.config for r in runs]))
    return {v.claim: v for v in verdicts(study, swept)}


# ---------------------------------------------------------------- the seed rule


def two_arm_runs(seeds) -> list[RunRecord]:
    return [synthetic_run("seed_rule", 5.0 + arm + 0.01 * seed, seed=seed, optim__lr=lr)
            for arm, lr in enumerate((1e-3, 1e-2)) for seed in seeds]


@pytest.fixture
def seed_rule_study(monkeypatch):
    def by_interval(s):
        diff, half = common.difference(common.finals(common.pick(s, optim__lr=1e-3)),
                                       common.finals(common.pick(s, optim__lr=1e-2)))
        return f"{diff:+.2f}", diff > 0, {}

    def by_means(s):
        gap = common.mean(common.finals(common.pick(s, optim__lr=1e-2))) - 5.0
        return f"{gap:+.2f}", gap > 0, {}

    monkeypatch.setitem(common.EXPECTATIONS, "seed_rule", [("by interval", by_interval), ("by means", by_means)])


@pytest.mark.parametrize("seeds, by_interval, by_means", [
    ((0,), "+1.00 — single-seed observation", "+1.00 — single-seed observation"),
    ((0, 1), "+1.00 — 2-seed observation (fewer than 3)", "+1.00 — 2-seed observation (fewer than 3)"),
    ((0, 1, 2), "+1.00 (3 seeds per arm; intervals: 95% Student t over the seeds)",
     "+1.01 (3 seeds per arm; seed means, no interval)"),
])
def test_every_verdict_names_the_seeds_it_rests_on(seed_rule_study, seeds, by_interval, by_means):
    found = judged("seed_rule", two_arm_runs(seeds))
    assert found["by interval"].measured == by_interval and found["by means"].measured == by_means
    assert found["by interval"].seeds == len(seeds) and found["by interval"].passed


def test_the_fewest_seeds_of_any_arm_count(seed_rule_study):
    runs = [r for r in two_arm_runs(SEEDS) if not (r.config["optim"]["lr"] == 1e-2 and r.config["seed"] == 2)]
    assert judged("seed_rule", runs)["by means"].measured.endswith("2-seed observation (fewer than 3)")


def test_a_sweep_of_one_arm_gets_no_seed_note(seed_rule_study):
    runs = [r for r in two_arm_runs(SEEDS) if r.config["optim"]["lr"] == 1e-2]
    assert judged("seed_rule", runs)["by means"].seeds is None


# ---------------------------------------------------------------- dyt


@pytest.mark.parametrize("flips", [True, False])
def test_dyt_verdicts(flips):
    gap = {200: 0.3, 600: -0.3 if flips else 0.3}  # DyT − LayerNorm per budget, well outside the seeds' spread
    runs = [synthetic_run("dyt", 5.0 + (gap[steps] if kind == "dyt" else 0.1 * (kind == "rmsnorm")) + 0.01 * seed,
                          seed=seed, norm__kind=kind, train__max_steps=steps)
            for kind in ("layernorm", "rmsnorm", "dyt") for steps in (200, 600) for seed in SEEDS]
    found = judged("dyt", runs)
    assert found["which of DyT and LayerNorm ends lower changes between the two budgets"].passed is flips
    assert found["at the shorter token budget DyT matches LayerNorm within the seeds' interval"].passed is False
    assert "lowest layernorm" in found["which of DyT and LayerNorm ends lower changes between the two budgets"].measured
    same = [synthetic_run("dyt", 5.0 + 0.02 * seed * (kind == "dyt") + 0.01 * seed, seed=seed, norm__kind=kind,
                          train__max_steps=steps)
            for kind in ("layernorm", "rmsnorm", "dyt") for steps in (200, 600) for seed in SEEDS]
    assert judged("dyt", same)["at the longer token budget DyT matches LayerNorm within the seeds' interval"].passed


# ---------------------------------------------------------------- curse_of_depth


@pytest.mark.parametrize("scaling_helps", [True, False])
def test_curse_of_depth_verdicts(scaling_helps):
    cursed = {"diag/resid_var": [1, 2, 4, 8, 16, 32], "diag/block_skip_dloss": [1.0, 0.5, 0.3, 0.1, 0.02, 0.01]}
    healthy = {"diag/resid_var": [1, 1.1, 1.2, 1.3, 1.4, 1.5], "diag/block_skip_dloss": [1.0, 0.6, 0.5, 0.4, 0.4, 0.4]}
    arms = {False: cursed, True: healthy if scaling_helps else cursed}
    runs = [synthetic_run("curse_of_depth", 5.0, seed=seed, n_layer=6, norm__depth_scaling=scaled,
                          at_end={k: [v * (1 + 0.01 * seed) for v in values] for k, values in arms[scaled].items()})
            for scaled in (False, True) for seed in SEEDS]
    found = judged("curse_of_depth", runs)
    grows = found["without LayerNorm Scaling the residual stream's variance grows with depth"]
    assert grows.passed and "at the end 32.00 ± 0.00" in grows.measured
    assert found["without LayerNorm Scaling skipping one of the deepest blocks barely moves the loss"].passed
    assert found["LayerNorm Scaling holds the growth of the residual variance down"].passed is scaling_helps
    assert found["LayerNorm Scaling gives the deepest blocks a larger share of the loss"].passed is scaling_helps


def test_the_depth_profile_is_drawn_from_the_per_block_metrics(tmp_path):
    def runs(at_end):
        return [synthetic_run("curse_of_depth", 5.0, seed=seed, n_layer=3, norm__depth_scaling=scaled, at_end=at_end)
                for scaled in (False, True) for seed in SEEDS]
    with_data = runs({"diag/resid_var": [1, 2, 4], "diag/block_skip_dloss": [1.0, 0.5, 0.1]})
    swept = sweep.Sweep([sweep.run_stats(r) for r in with_data], ["norm.depth_scaling"])
    assert figures.plot_depth_profile(swept, figures.Layout.of(swept, None), tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
    without = sweep.Sweep([sweep.run_stats(r) for r in runs({})], ["norm.depth_scaling"])
    assert not figures.plot_depth_profile(without, figures.Layout.of(without, None), tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


# ---------------------------------------------------------------- softcap


@pytest.mark.parametrize("cap_helps_qk_norm", [True, False])
def test_softcap_verdicts(cap_helps_qk_norm):
    top_ok = {(False, None): 3e-2, (False, 50): 1e-1, (True, None): 1e-1,  # the highest LR that trains, per arm
              (True, 50): 3e-1 if cap_helps_qk_norm else 1e-1}
    runs = [synthetic_run("softcap", (5.0 if lr <= top_ok[(qk, cap)] else 6.0) + 0.01 * seed, seed=seed,
                          model__qk_norm=qk, model__attn_softcap=cap, optim__lr=lr)
            for qk in (False, True) for cap in (None, 50) for lr in (3e-2, 1e-1, 3e-1) for seed in SEEDS]
    found = judged("softcap", runs)
    assert found["without qk-norm the attention cap tolerates a higher learning rate"].passed
    with_qk = found["with qk-norm, adding the attention cap tolerates about 1.5× the learning rate"]
    assert with_qk.passed is cap_helps_qk_norm


def test_softcap_a_diverged_seed_is_not_tolerated():
    runs = [synthetic_run("softcap", None if (cap and lr == 1e-1 and seed == 0) else 5.0 + 0.01 * seed, seed=seed,
                          model__qk_norm=False, model__attn_softcap=cap, optim__lr=lr)
            for cap in (None, 50) for lr in (3e-2, 1e-1) for seed in SEEDS]
    found = judged("softcap", runs)["without qk-norm the attention cap tolerates a higher learning rate"]
    assert found.passed is False and found.numbers["with_cap"] == 3e-2


# ---------------------------------------------------------------- skip_step


@pytest.mark.parametrize("rule_helps", [True, False])
def test_skip_step_verdicts(rule_helps):
    def run(skip, lr, seed):
        spiky = lr == 1e-1
        final = (5.2 if rule_helps else 6.2) if (spiky and skip) else (6.0 if spiky else 5.0)
        skipped = {10: 5.0 if spiky else 0.0} if skip else {}
        return synthetic_run("skip_step", final + 0.01 * seed, seed=seed, optim__skip_spikes=skip, optim__lr=lr,
                             series={"optim/skipped_spikes": skipped},
                             summary={"diag/loss_spike_score": 0.02 if spiky and not skip else 0.0})
    runs = [run(skip, lr, seed) for skip in (False, True) for lr in (3e-3, 1e-1) for seed in SEEDS]
    found = judged("skip_step", runs)
    damage = found["at a learning rate that spikes the rule removes the spikes' damage: a lower final loss"]
    assert damage.passed is rule_helps and "3/3 runs without the rule spiked" in damage.measured
    assert found["at a safe learning rate the rule skips (almost) nothing"].passed
    assert found["at a safe learning rate the rule changes nothing"].passed


def test_skip_step_without_a_spike_the_damage_is_not_measured():
    runs = [synthetic_run("skip_step", 5.0 + 0.01 * seed, seed=seed, optim__skip_spikes=skip, optim__lr=lr,
                          series={"optim/skipped_spikes": {10: 0.0}})
            for skip in (False, True) for lr in (3e-3, 1e-1) for seed in SEEDS]
    damage = judged("skip_step", runs)["at a learning rate that spikes the rule removes the spikes' damage: a lower "
                                       "final loss"]
    assert damage.passed is None and "no run without the rule spiked" in damage.measured


# ---------------------------------------------------------------- reordered_norm


@pytest.mark.parametrize("reordered_stabler", [True, False])
def test_reordered_norm_verdicts(reordered_stabler):
    pre = {3e-3: 5.3, 1e-2: 5.0, 3e-2: 5.5, 1e-1: 6.2}
    better = {3e-3: 5.3, 1e-2: 5.0, 3e-2: 5.1, 1e-1: 5.4}
    losses = {"pre": pre, "reordered": better if reordered_stabler else {lr: v + 0.3 for lr, v in pre.items()}}
    runs = [synthetic_run("reordered_norm", losses[placement][lr] + 0.01 * seed, seed=seed,
                          model__placement=placement, optim__lr=lr, model__qk_norm=True,
                          summary={"spikes": [{"step": 5, "peak": 8.0, "steps_above": 1}]}
                          if (lr == 1e-1 and placement == ("pre" if reordered_stabler else "reordered")) else None)
            for placement in ("pre", "reordered") for lr in pre for seed in SEEDS]
    found = judged("reordered_norm", runs)
    assert found["at its best learning rate the reordered norm trains at least as well as pre-norm"].passed \
        is reordered_stabler
    assert found["the reordered norm spikes or diverges no more often than pre-norm"].passed is reordered_stabler
    assert found["at the top of the learning-rate grid the reordered norm ends lower than pre-norm"].passed \
        is reordered_stabler
    assert found["the reordered norm has the lower LR sensitivity"].passed is reordered_stabler


# ---------------------------------------------------------------- attention_sink


def per_layer_series(prefix: str, by_step: dict[int, list[float]]) -> dict:
    """`series` for synthetic_run: {prefix/L{i}: {step: value}} from {step: [value per layer]}."""
    layers = len(next(iter(by_step.values())))
    return {f"{prefix}/L{i}": {step: values[i] for step, values in by_step.items()} for i in range(layers)}


@pytest.mark.parametrize("gate_removes_it", [True, False])
def test_attention_sink_verdicts(gate_removes_it):
    growing = {1: [0.06, 0.06], 5: [0.2, 0.1], 10: [0.5, 0.1]}
    flat = {1: [0.06, 0.06], 5: [0.05, 0.06], 10: [0.04, 0.05]}
    arms = {False: growing, True: flat if gate_removes_it else growing}
    runs = [synthetic_run("attention_sink", 5.0, seed=seed, model__attn_gate=gate, series=per_layer_series(
        "diag/attn_sink", {s: [v + 0.01 * seed for v in values] for s, values in arms[gate].items()}))
        for gate in (False, True) for seed in SEEDS]
    found = judged("attention_sink", runs)
    grows = found["without the gate the share of attention on the first token grows during training"]
    assert grows.passed and "0.060–0.080 at step 1, 0.500–0.520 at the end" in grows.measured
    assert found["with the gate the share of attention on the first token does not grow"].passed is gate_removes_it
    assert found["the gated model ends with less attention on the first token than the ungated one"].passed \
        is gate_removes_it


def test_attention_sink_sampled_once_is_not_measured():
    runs = [synthetic_run("attention_sink", 5.0, seed=seed, model__attn_gate=gate,
                          at_end={"diag/attn_sink": [0.1, 0.1]}) for gate in (False, True) for seed in SEEDS]
    assert all(v.passed is None and "sampled twice" in v.measured for v in judged("attention_sink", runs).values())


# ---------------------------------------------------------------- muon_maxlogit


def maxlogit_runs(clip_caps: bool, clip_engages: bool = True, qk_norm_bounds: bool = True) -> list[RunRecord]:
    """Muon and AdamW, no bound / qk-norm / QK-clip at tau 4, two LRs: the unbounded max logit rises to 8."""
    rising = {1: 0.1, 5: 3.0, 10: 8.0}
    shapes = {"none": rising, "qk_norm": {1: 0.1, 5: 2.0, 10: 2.0} if qk_norm_bounds else rising,
              "qk_clip": {1: 0.1, 5: 3.0, 10: 4.1 if clip_caps else 8.0}}
    bounds = {"none": {"model__qk_norm": False, "optim__qk_clip_tau": None},
              "qk_norm": {"model__qk_norm": True, "optim__qk_clip_tau": None},
              "qk_clip": {"model__qk_norm": False, "optim__qk_clip_tau": 4.0}}
    runs = []
    for optimizer in ("adamw", "muon"):
        for bound, peak in shapes.items():
            for lr in (1e-2, 3e-2):
                for seed in SEEDS:
                    series = per_layer_series("diag/attn_logit_max",
                                              {s: [v + 0.01 * seed * s, v / 2] for s, v in peak.items()})
                    series["optim/qk_clipped_heads"] = {s: float(bound == "qk_clip" and clip_engages and s >= 6)
                                                        for s in range(1, 11)}
                    runs.append(synthetic_run("muon_maxlogit", 5.0 + 0.01 * seed, seed=seed, optim__name=optimizer,
                                              optim__lr=lr, series=series, **bounds[bound]))
    return runs


@pytest.mark.parametrize("clip_caps", [True, False])
def test_muon_maxlogit_verdicts(clip_caps):
    found = judged("muon_maxlogit", maxlogit_runs(clip_caps, qk_norm_bounds=clip_caps))
    assert found["under Muon without qk-norm the per-head max attention logit keeps growing"].passed
    caps = found["under Muon QK-clip caps the max attention logit at tau"]
    assert caps.passed is clip_caps and "first clip at step 6" in caps.measured
    assert found["under Muon QK-clip costs no loss"].passed
    assert found["under Muon qk-norm bounds the max attention logit too: it does not keep growing"].passed is clip_caps


def test_muon_maxlogit_a_clip_that_never_engaged_is_not_measured():
    found = judged("muon_maxlogit", maxlogit_runs(True, clip_engages=False))
    assert found["under Muon QK-clip caps the max attention logit at tau"].passed is None
    assert "never engaged" in found["under Muon QK-clip costs no loss"].measured


def test_muon_maxlogit_a_clip_that_costs_loss_is_a_cost():
    runs = maxlogit_runs(True)
    for run in runs:
        if run.config["optim"]["qk_clip_tau"] and run.config["optim"]["name"] == "muon":
            run.rows[-1]["val/loss"] += 0.5
    assert judged("muon_maxlogit", runs)["under Muon QK-clip costs no loss"].passed is False


# ---------------------------------------------------------------- mup_transfer


@pytest.mark.parametrize("mup_transfers", [True, False])
def test_mup_transfer_verdicts(mup_transfers):
    lrs, best_sp = (2e-3, 4e-3, 8e-3, 1.6e-2), {64: 8e-3, 128: 4e-3, 256: 2e-3}
    best = {"sp": best_sp, "mup": {64: 8e-3, 128: 8e-3, 256: 8e-3} if mup_transfers else best_sp}
    runs = [synthetic_run("mup_transfer", 5.0 + abs(math.log2(lr / best[p][w])) * 0.1 + 0.01 * seed, seed=seed,
                          model__parametrization=p, model__d_model=w, optim__lr=lr,
                          at_end={"diag/attn_logit_max": [lr * 1000 * (w / 64 if p == "sp" or not mup_transfers
                                                                       else 1), 1.0]})
            for p in best for w in best_sp for lr in lrs for seed in SEEDS]
    found = judged("mup_transfer", runs)
    moves = found["under the standard parametrization the best learning rate moves down as the width grows"]
    assert moves.passed and "width 256: best lr 0.002" in moves.measured
    assert found["under μP the best learning rate stays put across widths"].passed is mup_transfers
    logits = found["open question: under μP, without qk-norm, the max attention logit does not grow with width"]
    assert logits.passed is mup_transfers and logits.numbers["sp"] == pytest.approx([4.0] * 4)
