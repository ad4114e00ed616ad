"""AdamW's eps at the gradient RMS shrinks the update and slows learning (Wortsman et al. 2023)."""

import statistics

from minilm.analysis.studies.common import NotMeasured, expect, finals, listing, mean, pick, values_of
from minilm.analysis.sweep import RunStats, Sweep, mean_by_group


def _over_groups(run: RunStats, prefix: str, average=statistics.fmean) -> float:
    """`average` over parameter groups of each group's mean over the sampled steps after step 1."""
    by_group = mean_by_group(run, prefix)
    if not by_group:
        raise NotMeasured(f"{prefix}* was not logged")
    return average(by_group.values())


def _gradient_rms(sweep: Sweep) -> float:
    """The typical gradient RMS: the median over runs of the median over parameter groups."""
    return statistics.median(_over_groups(r, "diag/grad_rms/", statistics.median) for r in sweep.stats)


@expect("adamw_eps", "once eps reaches the gradient RMS the update RMS falls")
def _eps_update(sweep: Sweep):
    eps = values_of(sweep, "optim.eps")
    update = [mean(_over_groups(r, "diag/update_rms/") for r in pick(sweep, optim__eps=e)) for e in eps]
    grad = _gradient_rms(sweep)
    shown = " / ".join(f"{u:.2e}" for u in update)
    return (f"update RMS {shown} for eps {listing(eps)}; gradient RMS ≈ {grad:.1e} (median; falls = the largest "
            f"eps's below half the smallest's)", update[-1] < update[0] / 2,
            {"update": dict(zip(map(str, eps), update)), "grad_rms": grad})


@expect("adamw_eps", "a large eps slows learning")
def _eps_slows(sweep: Sweep):
    eps = values_of(sweep, "optim.eps")
    losses = [mean(finals(pick(sweep, optim__eps=e))) for e in eps]
    return (f"final val loss {listing(losses, 3)} for eps {listing(eps)}", losses[-1] > losses[0],
            dict(zip(map(str, eps), losses)))


@expect("adamw_eps", "an eps far below the gradient RMS changes nothing")
def _eps_small_harmless(sweep: Sweep):
    grad = _gradient_rms(sweep)
    small = [e for e in values_of(sweep, "optim.eps") if e < grad / 100]
    if len(small) < 2:
        raise NotMeasured(f"fewer than two eps below 1% of the gradient RMS {grad:.1e}")
    losses = [mean(finals(pick(sweep, optim__eps=e))) for e in small]
    spread = max(losses) - min(losses)
    return (f"final val loss {listing(losses, 3)} for eps {listing(small)} (below 1% of the gradient RMS {grad:.1e}): "
            f"spread {spread:.3f} (nothing = under 0.05)", spread < 0.05, {"spread": spread})
