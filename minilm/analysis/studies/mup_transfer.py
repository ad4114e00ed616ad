"""Learning-rate transfer across width: the standard parametrization against μP (Yang et al. 2022)."""

from minilm.analysis.studies.common import expect, finals, listing, mean, pick, run_max, values_of
from minilm.analysis.sweep import LR_KEY, Sweep

BOUNDED = 2.0  # the widest width's max attention logit at most this many times the narrowest's: "does not grow"


def _best_lrs(sweep: Sweep, parametrization: str) -> dict[int, tuple[float, dict[float, float]]]:
    """{width: (the LR of the lowest seed-mean final val loss, {LR: seed-mean final val loss})}."""
    found = {}
    for width in values_of(sweep, "model.d_model"):
        losses = {lr: mean(finals(pick(sweep, model__parametrization=parametrization, model__d_model=width,
                                       optim__lr=lr))) for lr in values_of(sweep, LR_KEY)}
        found[width] = (min(losses, key=losses.get), losses)
    return found


def _best_lr_text(best: dict) -> str:
    widths = sorted(best)
    return "; ".join(f"width {w}: best lr {best[w][0]:g} (final val loss {listing(best[w][1].values(), 3)} at lr "
                     f"{listing(best[w][1])})" for w in widths)


@expect("mup_transfer", "under the standard parametrization the best learning rate moves down as the width grows")
def _sp_moves(sweep: Sweep):
    best = _best_lrs(sweep, "sp")
    narrow, wide = best[min(best)][0], best[max(best)][0]
    return (f"SP, {_best_lr_text(best)} (moves = the widest width's best LR below the narrowest's)", wide < narrow,
            {w: lr for w, (lr, _) in best.items()})


@expect("mup_transfer", "under μP the best learning rate stays put across widths")
def _mup_stays(sweep: Sweep):
    best = _best_lrs(sweep, "mup")
    return (f"μP, {_best_lr_text(best)} (stays put = the same grid point at every width)",
            len({lr for lr, _ in best.values()}) == 1, {w: lr for w, (lr, _) in best.items()})


@expect("mup_transfer", "open question: under μP, without qk-norm, the max attention logit does not grow with width")
def _mup_logits(sweep: Sweep):
    widths, lrs = values_of(sweep, "model.d_model"), values_of(sweep, LR_KEY)
    ratios, shown = {}, []
    for parametrization in ("sp", "mup"):
        peak = {(w, lr): mean(run_max(r, "diag/attn_logit_max") for r in pick(
            sweep, model__parametrization=parametrization, model__d_model=w, optim__lr=lr))
            for w in widths for lr in lrs}
        ratios[parametrization] = [peak[(widths[-1], lr)] / peak[(widths[0], lr)] for lr in lrs]
        shown.append(f"{parametrization}: " + ", ".join(
            f"lr {lr:g} {listing([peak[(w, lr)] for w in widths], 1)}" for lr in lrs))
    return (f"largest max attention logit of the run (seed mean) at width {listing(widths)}, "
            f"{'; '.join(shown)}; widest / narrowest {listing(ratios['mup'], 2)} (μP) and "
            f"{listing(ratios['sp'], 2)} (SP) at lr {listing(lrs)} (does not grow = μP's ratio at most {BOUNDED:g} at "
            f"every LR)", max(ratios["mup"]) <= BOUNDED, ratios)
