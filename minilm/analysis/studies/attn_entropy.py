"""Attention entropy collapse at high learning rates, prevented by qk-norm (Zhai et al. 2023)."""

from minilm.analysis.studies.common import NotMeasured, expect, listing, mean, pick, values_of
from minilm.analysis.sweep import LR_KEY, RunStats, Sweep


def _min_entropy(run: RunStats) -> float:
    """The lowest attention entropy of any layer at any sampled step after step 1."""
    values = [min(v) for step, v in run.per_layer("diag/attn_entropy").items() if step > 1]
    if not values:
        raise NotMeasured("diag/attn_entropy was not logged after step 1")
    return min(values)


def _entropy_by_lr(sweep: Sweep, qk_norm: bool) -> dict[float, float]:
    return {lr: mean(_min_entropy(r) for r in pick(sweep, optim__lr=lr, model__qk_norm=qk_norm))
            for lr in values_of(sweep, LR_KEY)}


@expect("attn_entropy", "at a high learning rate without qk-norm the attention entropy collapses")
def _entropy_collapses(sweep: Sweep):
    by_lr = _entropy_by_lr(sweep, False)
    lrs = sorted(by_lr)
    low, high = by_lr[lrs[0]], by_lr[lrs[-1]]
    return (f"lowest layer entropy {listing([by_lr[lr] for lr in lrs], 2)} nats at lr {listing(lrs)} without qk-norm "
            f"(collapse = at the highest LR below half its value at the lowest)", high < low / 2,
            {str(lr): v for lr, v in by_lr.items()})


@expect("attn_entropy", "with qk-norm the entropy stays up at every learning rate")
def _entropy_kept(sweep: Sweep):
    by_lr = _entropy_by_lr(sweep, True)
    lrs = sorted(by_lr)
    return (f"lowest layer entropy {listing([by_lr[lr] for lr in lrs], 2)} nats at lr {listing(lrs)} with qk-norm "
            f"(stays up = at least half its value at the lowest LR)", min(by_lr.values()) >= by_lr[lrs[0]] / 2,
            {str(lr): v for lr, v in by_lr.items()})


@expect("attn_entropy", "the entropy falls before the loss spikes or diverges")
def _entropy_first(sweep: Sweep):
    found = []
    for run in pick(sweep, model__qk_norm=False):
        event = run.diverged_at if run.diverged else min((s["step"] for s in run.spikes), default=None)
        if event is None:
            continue
        entropy = run.per_layer("diag/attn_entropy")
        start = min(entropy[min(entropy)]) if entropy else None
        fell = next((step for step, v in entropy.items() if start and min(v) < start / 2), None)
        found.append((run.flat[LR_KEY], event, fell))
    if not found:
        raise NotMeasured("no run without qk-norm spiked or diverged")
    shown = "; ".join(f"lr {lr:g}: event at step {event}, entropy below half its step-1 value "
                      f"{'at step ' + str(fell) if fell else 'never'}" for lr, event, fell in found)
    return shown, all(fell is not None and fell < event for _, event, fell in found), {"runs": found}
