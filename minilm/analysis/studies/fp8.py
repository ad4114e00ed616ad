"""fp8 linears against bf16, tensorwise and rowwise scaling (Peng et al. 2023; Fishman et al. 2024)."""

import statistics

from minilm.analysis.studies.common import (
    SAME_LOSS,
    NotMeasured,
    difference,
    expect,
    finals,
    listing,
    mean,
    pick,
    rank_correlation,
    sensitivity,
    values_of,
)
from minilm.analysis.sweep import LR_KEY, RunStats, Sweep


def _fp8_arms(sweep: Sweep) -> dict[str, dict]:
    """{arm: {"precision__name": ..., "precision__fp8_recipe": ...}} of bf16 and the two fp8 recipes."""
    return {"bf16": {"precision__name": "bf16"},
            "tensorwise": {"precision__name": "fp8", "precision__fp8_recipe": "tensorwise"},
            "rowwise": {"precision__name": "fp8", "precision__fp8_recipe": "rowwise"}}


@expect("fp8", "at the default learning rate fp8 tracks bf16 within the seeds' spread")
def _fp8_tracks(sweep: Sweep):
    lr = 3e-3 if 3e-3 in values_of(sweep, LR_KEY, 1) else values_of(sweep, LR_KEY, 1)[0]
    base = finals(pick(sweep, **_fp8_arms(sweep)["bf16"], optim__lr=lr))
    parts, agrees, numbers = [], True, {}
    for recipe in ("tensorwise", "rowwise"):
        diff, half = difference(base, finals(pick(sweep, **_fp8_arms(sweep)[recipe], optim__lr=lr)))
        within = abs(diff) <= max(half or 0.0, SAME_LOSS)
        agrees &= within
        parts.append(f"{recipe} − bf16 = {diff:+.3f}" + (f" ± {half:.3f}" if half else ""))
        numbers[recipe] = diff
    return (f"at lr {lr:g}: {'; '.join(parts)} (tracks = within the 95% CI of the difference or {SAME_LOSS} nats)",
            agrees, numbers)


def _fp8_gap_by_lr(sweep: Sweep) -> dict[float, float]:
    """{lr: mean final loss of the two fp8 recipes minus bf16's}."""
    gaps = {}
    for lr in values_of(sweep, LR_KEY):
        base = mean(finals(pick(sweep, **_fp8_arms(sweep)["bf16"], optim__lr=lr)))
        fp8 = mean(finals(pick(sweep, precision__name="fp8", optim__lr=lr)))
        gaps[lr] = fp8 - base
    return gaps


@expect("fp8", "the fp8 loss gap grows with the learning rate")
def _fp8_gap_grows(sweep: Sweep):
    gaps = _fp8_gap_by_lr(sweep)
    lrs = sorted(gaps)
    return (f"fp8 − bf16 final val loss at lr {listing(lrs)}: {listing([gaps[lr] for lr in lrs], 3)} (grows = larger "
            f"at the highest LR than at the lowest)", gaps[lrs[-1]] > gaps[lrs[0]], {"gaps": gaps})


@expect("fp8", "fp8 is at least as sensitive to the learning rate as bf16")
def _fp8_sensitivity(sweep: Sweep):
    found = {arm: sensitivity(sweep, **{**{"precision__fp8_recipe": None}, **where})
             for arm, where in _fp8_arms(sweep).items()}
    return (f"LR sensitivity {', '.join(f'{arm} {value:.3f}' for arm, value in found.items())} (at least = each fp8 "
            f"recipe within 0.02 below bf16's or above)",
            all(found[recipe] >= found["bf16"] - 0.02 for recipe in ("tensorwise", "rowwise")), found)


def _fp8_underflow(run: RunStats) -> float:
    """The run's mean over sampled steps of the worst fp8 layer's underflow fraction (inputs and gradients)."""
    per_step = []
    for row in run.record.rows or ():
        values = [float(v) for k, v in row.items() if k.startswith(("numerics/act_in/underflow/",
                                                                    "numerics/grad/underflow/"))
                  and not k.endswith("/head") and v is not None]
        if values:
            per_step.append(max(values))
    if not per_step:
        raise NotMeasured("numerics/*/underflow was not logged")
    return statistics.fmean(per_step)


@expect("fp8", "tensorwise scaling loses more small values to underflow than rowwise")
def _fp8_granularity(sweep: Sweep):
    found = {recipe: mean(_fp8_underflow(r) for r in pick(sweep, **_fp8_arms(sweep)[recipe]))
             for recipe in ("tensorwise", "rowwise")}
    return (f"worst fp8 layer's underflow fraction, mean over steps and runs: tensorwise {found['tensorwise']:.2e}, "
            f"rowwise {found['rowwise']:.2e}", found["tensorwise"] > found["rowwise"], found)


@expect("fp8", "the fraction of fp8 values lost to underflow grows with the learning rate")
def _fp8_underflow_grows(sweep: Sweep):
    lrs = values_of(sweep, LR_KEY)
    by_lr = [mean(_fp8_underflow(r) for r in pick(sweep, precision__name="fp8", optim__lr=lr)) for lr in lrs]
    rho = rank_correlation(lrs, by_lr)
    return (f"worst fp8 layer's underflow fraction at lr {listing(lrs)}: {', '.join(f'{v:.2e}' for v in by_lr)} "
            f"(grows = Spearman rho > 0; rho {rho:+.2f})", rho > 0, {"by_lr": dict(zip(lrs, by_lr)), "rho": rho})
