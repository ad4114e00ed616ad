"""z-loss anchors log Z at no cost in loss (Wortsman et al. 2023)."""

from minilm.analysis.studies.common import NotMeasured, difference, expect, finals, mean, pick, values_of
from minilm.analysis.sweep import RunStats, Sweep


def _logz(run: RunStats) -> tuple[float, float]:
    series = run.series("diag/logz_mean")
    if not series:
        raise NotMeasured("diag/logz_mean was not logged")
    return series[min(series)], series[max(series)]


@expect("zloss", "without z-loss log Z drifts up from its value at init")
def _logz_drifts(sweep: Sweep):
    runs = pick(sweep, optim__z_loss=0.0)
    start, end = mean(_logz(r)[0] for r in runs), mean(_logz(r)[1] for r in runs)
    return f"log Z {start:.2f} at step 1 → {end:.2f} at the end (seed means)", end > start, {"start": start,
                                                                                          "end": end}


@expect("zloss", "z-loss pulls log Z toward 0")
def _logz_pulled(sweep: Sweep):
    strongest = values_of(sweep, "optim.z_loss")[-1]
    off = mean(abs(_logz(r)[1]) for r in pick(sweep, optim__z_loss=0.0))
    on = mean(abs(_logz(r)[1]) for r in pick(sweep, optim__z_loss=strongest))
    return (f"|log Z| at the end {off:.2f} without z-loss vs {on:.2f} with z-loss {strongest:g}", on < off,
            {"without": off, "with": on})


@expect("zloss", "z-loss costs nothing in loss")
def _zloss_free(sweep: Sweep):
    strongest = values_of(sweep, "optim.z_loss")[-1]
    off, on = finals(pick(sweep, optim__z_loss=0.0)), finals(pick(sweep, optim__z_loss=strongest))
    diff, half = difference(off, on)
    shown = f"{diff:+.3f} ± {half:.3f} (95% CI)" if half is not None else f"{diff:+.3f} (one seed each: no CI)"
    return (f"final val loss with z-loss {strongest:g} minus without: {shown}; no cost = not significantly above 0",
            diff <= (half if half is not None else 0.0), {"difference": diff, "ci95": half})
