"""Post-norm needs a warmup (Xiong et al. 2020)."""

from minilm.analysis.studies.common import NotMeasured, expect, finals, listing, mean, pick, values_of
from minilm.analysis.sweep import Sweep


@expect("postnorm_warmup", "the longer the warmup, the lower the final loss")
def _warmup_order(sweep: Sweep):
    warmups = values_of(sweep, "optim.warmup_steps")
    losses = [mean(finals(pick(sweep, optim__warmup_steps=w))) for w in warmups]
    return (f"final val loss {listing(losses, 3)} for {listing(warmups)} warmup steps (seed means; a diverged run "
            f"counts its loss at init)", all(a > b for a, b in zip(losses, losses[1:])), dict(zip(map(str, warmups),
                                                                                                   losses)))


@expect("postnorm_warmup", "without warmup post-norm stalls well above the warmed-up arms, or diverges")
def _no_warmup_fails(sweep: Sweep):
    warmups = values_of(sweep, "optim.warmup_steps")
    if warmups[0] != 0:
        raise NotMeasured("no run without warmup")
    cold = pick(sweep, optim__warmup_steps=0)
    best = min(mean(finals(pick(sweep, optim__warmup_steps=w))) for w in warmups[1:])
    gap = mean(finals(cold)) - best
    diverged = sum(r.diverged for r in cold)
    return (f"{diverged}/{len(cold)} runs without warmup diverged; their final loss sits {gap:.2f} above the best "
            f"warmed-up arm ('well above' = 0.5 or more)", diverged > 0 or gap >= 0.5, {"gap": gap,
                                                                                       "diverged": diverged})
