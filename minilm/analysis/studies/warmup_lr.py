"""A longer warmup lowers the LR sensitivity (Wortsman et al. 2023)."""

from minilm.analysis.studies.common import expect, finals, listing, mean, pick, sensitivity_by, values_of
from minilm.analysis.sweep import LR_KEY, Sweep


@expect("warmup_lr", "a longer warmup lowers the LR sensitivity")
def _warmup_sensitivity(sweep: Sweep):
    by_warmup = sensitivity_by(sweep, "optim.warmup_steps")
    warmups = sorted(by_warmup)
    scores = [by_warmup[w] for w in warmups]
    return (f"LR sensitivity {listing(scores, 3)} for {listing(warmups)} warmup steps (lower = less sensitive)",
            scores[-1] < scores[0], {str(w): s for w, s in by_warmup.items()})


@expect("warmup_lr", "near the best learning rate the warmup length matters little")
def _warmup_best(sweep: Sweep):
    best = {}
    for warmup in values_of(sweep, "optim.warmup_steps"):
        best[warmup] = min(mean(finals(pick(sweep, optim__warmup_steps=warmup, optim__lr=lr)))
                           for lr in values_of(sweep, LR_KEY))
    spread = max(best.values()) - min(best.values())
    return (f"best final val loss over the LR grid {listing([best[w] for w in sorted(best)], 3)} for "
            f"{listing(sorted(best))} warmup steps: spread {spread:.3f} ('little' = under 0.1)", spread < 0.1,
            {"spread": spread})
