"""OLMo-core's skip-step rule at a learning rate that spikes and at a safe one."""

from minilm.analysis.studies.common import NotMeasured, difference, expect, finals, mean, pick, values_of
from minilm.analysis.sweep import LR_KEY, RunStats, Sweep

ALMOST_NOTHING = 0.01  # of the steps: a rule that skips no more skips "almost nothing"


def _skipped(run: RunStats) -> float:
    """Updates the rule skipped over the run (the last logged running count)."""
    series = run.series("optim/skipped_spikes")
    if not series:
        raise NotMeasured("optim/skipped_spikes was not logged")
    return series[max(series)]


def _spiked(run: RunStats) -> bool:
    """A loss step 7 standard deviations off its window (diag/loss_spike_score) or a divergence-line crossing."""
    return bool(run.spikes) or run.diverged or (run.record.summary.get("diag/loss_spike_score") or 0) > 0


@expect("skip_step", "at a learning rate that spikes the rule removes the spikes' damage: a lower final loss")
def _removes_damage(sweep: Sweep):
    lr = values_of(sweep, LR_KEY)[-1]
    off, on = pick(sweep, optim__skip_spikes=False, optim__lr=lr), pick(sweep, optim__skip_spikes=True, optim__lr=lr)
    spiked = sum(_spiked(r) for r in off)
    if not spiked:
        raise NotMeasured(f"no run without the rule spiked at lr {lr:g}")
    diff, half = difference(finals(off), finals(on))
    if half is None:
        raise NotMeasured("fewer than two seeds per arm")
    return (f"at lr {lr:g}: {spiked}/{len(off)} runs without the rule spiked; the rule skipped "
            f"{mean(_skipped(r) for r in on):.1f} updates per run; final val loss with the rule minus without "
            f"{diff:+.3f} ± {half:.3f} (lower = the interval below 0)", diff + half < 0,
            {"difference": diff, "ci95": half, "spiked": spiked})


@expect("skip_step", "at a safe learning rate the rule skips (almost) nothing")
def _skips_little(sweep: Sweep):
    lr = values_of(sweep, LR_KEY)[0]
    runs = pick(sweep, optim__skip_spikes=True, optim__lr=lr)
    skipped, steps = mean(_skipped(r) for r in runs), mean(max(r.curve, default=0) for r in runs)
    return (f"at lr {lr:g}: {skipped:.1f} of {steps:.0f} updates skipped per run (almost nothing = at most "
            f"{ALMOST_NOTHING:.0%})", skipped <= ALMOST_NOTHING * steps, {"skipped": skipped, "steps": steps})


@expect("skip_step", "at a safe learning rate the rule changes nothing")
def _changes_nothing(sweep: Sweep):
    lr = values_of(sweep, LR_KEY)[0]
    diff, half = difference(finals(pick(sweep, optim__skip_spikes=False, optim__lr=lr)),
                            finals(pick(sweep, optim__skip_spikes=True, optim__lr=lr)))
    if half is None:
        raise NotMeasured("fewer than two seeds per arm")
    return (f"at lr {lr:g}: final val loss with the rule minus without {diff:+.3f} ± {half:.3f} (nothing = the "
            f"interval holds 0)", abs(diff) <= half, {"difference": diff, "ci95": half})
