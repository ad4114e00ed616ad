"""fp32, fp16 (dynamic loss scaling) and bf16, LayerNorm and RMSNorm: the same final loss (Micikevicius et al. 2018)."""

from minilm.analysis.studies.common import NotMeasured, difference, expect, finals, interval, mean, pick
from minilm.analysis.sweep import Sweep, arm_label


@expect("precision_matrix", "every arm reaches the same final val loss within its seeds' 95% CI")
def _precision_agree(sweep: Sweep):
    intervals = {}
    for arm, runs in sweep.arms.items():
        m, half = interval([r.final_val for r in runs if r.final_val is not None])
        if half is not None:
            intervals[arm_label(arm, sweep.keys)] = (m - half, m + half)
    if len(intervals) < 2:
        raise NotMeasured("fewer than two arms with two seeds or more")
    low, high = max(lo for lo, _ in intervals.values()), min(hi for _, hi in intervals.values())
    means = [(lo + hi) / 2 for lo, hi in intervals.values()]
    return (f"arm means {min(means):.3f}–{max(means):.3f}; the {len(intervals)} intervals "
            f"{'share' if low <= high else 'do not share'} a common value", low <= high,
            {"mean_min": min(means), "mean_max": max(means), "common_low": low, "common_high": high})


@expect("precision_matrix", "fp16 skips a few steps at the start while its scaler backs off, then next to none")
def _fp16_skips(sweep: Sweep):
    runs = [r for r in pick(sweep, precision__name="fp16") if r.series("amp/skipped_steps")]
    if not runs:
        raise NotMeasured("no fp16 run logged amp/skipped_steps")
    early = mean(max((v for s, v in r.series("amp/skipped_steps").items() if s <= 100), default=0) for r in runs)
    total = mean(r.skipped for r in runs)
    later_steps = mean(max(r.curve, default=0) - 100 for r in runs)
    scale = mean(list(r.series("amp/scale").values())[-1] for r in runs if r.series("amp/scale"))
    later = total - early
    agrees = early > 0 and later <= 0.01 * max(later_steps, 1)
    return (f"{early:.1f} skipped in steps 1–100, {later:.1f} after (mean over {len(runs)} fp16 runs; 'next to "
            f"none' = at most 1% of the later steps); loss scale at the end {scale:g}", agrees,
            {"early": early, "later": later, "final_scale": scale})


@expect("precision_matrix", "LayerNorm and RMSNorm are indistinguishable")
def _norms_alike(sweep: Sweep):
    ln = finals(pick(sweep, norm__kind="layernorm"))
    rms = finals(pick(sweep, norm__kind="rmsnorm"))
    diff, half = difference(ln, rms)
    if half is None:
        raise NotMeasured("fewer than two runs per norm kind")
    return (f"final val loss {mean(ln):.3f} (LayerNorm) vs {mean(rms):.3f} (RMSNorm), pooled over precisions: "
            f"difference {diff:+.3f} ± {half:.3f} (95% CI)", abs(diff) <= half, {"difference": diff, "ci95": half})
