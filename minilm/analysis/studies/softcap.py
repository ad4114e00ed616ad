"""Soft-capped attention logits, with and without qk-norm: the highest learning rate tolerated (Rybakov et al. 2024)."""

from minilm.analysis.studies.common import NotMeasured, expect, finals, listing, mean, pick, values_of
from minilm.analysis.sweep import LR_KEY, Sweep

TOLERATED = 0.25  # nats: an LR is tolerated when no seed diverged and the seed mean ends this close to the best


def _best(sweep: Sweep) -> float:
    """The lowest seed-mean final val loss of any arm at any learning rate."""
    return min(mean(finals(runs)) for runs in sweep.arms.values())


def _max_tolerated(sweep: Sweep, qk_norm: bool, cap) -> tuple[float | None, dict]:
    """(the highest LR tolerated, {LR: seed-mean loss above the best}) of the arm with this qk-norm and cap."""
    best, gaps, top = _best(sweep), {}, None
    for lr in values_of(sweep, LR_KEY):
        runs = pick(sweep, model__qk_norm=qk_norm, model__attn_softcap=cap, optim__lr=lr)
        gaps[lr] = mean(finals(runs)) - best
        if not any(r.diverged for r in runs) and gaps[lr] <= TOLERATED:
            top = lr
    return top, gaps


def _cap_gain(qk_norm: bool, factor: float):
    def check(sweep: Sweep):
        caps = values_of(sweep, "model.attn_softcap", 1)  # the caps, None (no cap) left out
        if None not in sweep.values("model.attn_softcap"):
            raise NotMeasured("needs runs with and without the attention cap")
        cap = caps[0]
        found = {c: _max_tolerated(sweep, qk_norm, c) for c in (None, cap)}
        without, with_cap = found[None][0], found[cap][0]
        lrs = sorted(found[None][1])
        gains = "; ".join(f"{'cap ' + format(c, 'g') if c else 'no cap'}: {listing([g[lr] for lr in lrs], 2)} above "
                          f"the best" for c, (_, g) in found.items())
        agrees = with_cap is not None and (without is None or with_cap >= factor * without)
        return (f"{'with' if qk_norm else 'without'} qk-norm, highest LR tolerated {without or 'none'} without the "
                f"cap, {with_cap or 'none'} with cap {cap:g} (lr {listing(lrs)}: {gains}; tolerated = no seed "
                f"diverged and the seed mean within {TOLERATED} nats of the study's best; agrees = at least "
                f"{factor:g}× higher, on a grid of {lrs[1] / lrs[0]:.1f}× steps)", agrees,
                {"without_cap": without, "with_cap": with_cap})
    return check


expect("softcap", "without qk-norm the attention cap tolerates a higher learning rate")(_cap_gain(False, 1.01))
expect("softcap", "with qk-norm, adding the attention cap tolerates about 1.5× the learning rate")(_cap_gain(True, 1.5))
