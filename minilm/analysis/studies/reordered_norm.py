"""OLMo 2's reordered norm against pre-norm across learning rates, with qk-norm and z-loss (Team OLMo 2025)."""

from minilm.analysis.studies.common import (
    difference,
    events,
    expect,
    finals,
    listing,
    mean,
    pick,
    sensitivity,
    values_of,
)
from minilm.analysis.sweep import LR_KEY, Sweep

PLACEMENTS = ("pre", "reordered")


def _by_lr(sweep: Sweep, placement: str) -> dict[float, list[float]]:
    return {lr: finals(pick(sweep, model__placement=placement, optim__lr=lr)) for lr in values_of(sweep, LR_KEY)}


@expect("reordered_norm", "at its best learning rate the reordered norm trains at least as well as pre-norm")
def _as_well(sweep: Sweep):
    best = {}
    for placement in PLACEMENTS:
        by_lr = _by_lr(sweep, placement)
        lr = min(by_lr, key=lambda lr: mean(by_lr[lr]))
        best[placement] = (lr, by_lr[lr])
    diff, half = difference(best["pre"][1], best["reordered"][1])
    shown = f"± {half:.3f}" if half is not None else "(one seed each: no interval)"
    return (f"best final val loss {mean(best['pre'][1]):.3f} (pre, lr {best['pre'][0]:g}) vs "
            f"{mean(best['reordered'][1]):.3f} (reordered, lr {best['reordered'][0]:g}): reordered − pre {diff:+.3f} "
            f"{shown} (at least as well = not above the interval)", half is not None and diff <= half,
            {"difference": diff, "ci95": half})


@expect("reordered_norm", "the reordered norm spikes or diverges no more often than pre-norm")
def _no_more_events(sweep: Sweep):
    found = {p: (events(pick(sweep, model__placement=p)), len(pick(sweep, model__placement=p))) for p in PLACEMENTS}
    return (f"runs that spiked or diverged: {found['pre'][0]}/{found['pre'][1]} (pre) vs "
            f"{found['reordered'][0]}/{found['reordered'][1]} (reordered)", found["reordered"][0] <= found["pre"][0],
            {p: n for p, (n, _) in found.items()})


@expect("reordered_norm", "at the top of the learning-rate grid the reordered norm ends lower than pre-norm")
def _top_lr(sweep: Sweep):
    top = values_of(sweep, LR_KEY)[-1]
    pre, reordered = _by_lr(sweep, "pre")[top], _by_lr(sweep, "reordered")[top]
    diff, half = difference(pre, reordered)
    shown = f"± {half:.3f}" if half is not None else "(one seed each: no interval)"
    return (f"at lr {top:g}: {mean(pre):.3f} (pre) vs {mean(reordered):.3f} (reordered): reordered − pre {diff:+.3f} "
            f"{shown} (lower = the interval below 0)", half is not None and diff + half < 0,
            {"difference": diff, "ci95": half})


@expect("reordered_norm", "the reordered norm has the lower LR sensitivity")
def _sensitivity(sweep: Sweep):
    found = {p: sensitivity(sweep, model__placement=p) for p in PLACEMENTS}
    losses = {p: [mean(v) for v in _by_lr(sweep, p).values()] for p in PLACEMENTS}
    return (f"LR sensitivity {found['pre']:.3f} (pre) vs {found['reordered']:.3f} (reordered); final val loss "
            f"{listing(losses['pre'], 3)} (pre), {listing(losses['reordered'], 3)} (reordered) at lr "
            f"{listing(values_of(sweep, LR_KEY))}", found["reordered"] < found["pre"], found)
