"""Pre-norm against post-norm, LayerNorm against RMSNorm (Xiong et al. 2020)."""

import statistics

from minilm.analysis.studies.common import NotMeasured, difference, events, expect, finals, mean, pick, values_of
from minilm.analysis.sweep import Sweep


@expect("norm_placement", "post-norm ends at a higher final val loss than pre-norm")
def _post_higher(sweep: Sweep):
    pre, post = finals(pick(sweep, model__placement="pre")), finals(pick(sweep, model__placement="post"))
    diff, half = difference(pre, post)
    if half is None:
        raise NotMeasured("fewer than two runs per placement")
    return (f"{mean(pre):.3f} (pre) vs {mean(post):.3f} (post), pooled over norm kinds: post − pre = {diff:+.3f} ± "
            f"{half:.3f} (95% CI; higher = the interval above 0)", diff - half > 0, {"difference": diff, "ci95": half})


@expect("norm_placement", "post-norm's final loss spreads wider over seeds")
def _post_spread(sweep: Sweep):
    spread = {}
    for placement in ("pre", "post"):
        stds = [statistics.stdev(finals(pick(sweep, model__placement=placement, norm__kind=kind)))
                for kind in values_of(sweep, "norm.kind", 1)
                if len(sweep.runs({"model.placement": placement, "norm.kind": kind})) > 1]
        if not stds:
            raise NotMeasured("fewer than two seeds per arm")
        spread[placement] = mean(stds)
    return (f"seed std {spread['pre']:.3f} (pre) vs {spread['post']:.3f} (post), mean over norm kinds",
            spread["post"] > spread["pre"], spread)


@expect("norm_placement", "post-norm spikes or diverges more often")
def _post_events(sweep: Sweep):
    pre, post = pick(sweep, model__placement="pre"), pick(sweep, model__placement="post")
    return (f"runs that spiked or diverged: {events(pre)}/{len(pre)} (pre) vs {events(post)}/{len(post)} (post)",
            events(post) > events(pre), {"pre": events(pre), "post": events(post)})


@expect("norm_placement", "the placement matters more than the kind of norm")
def _placement_over_kind(sweep: Sweep):
    placement = abs(mean(finals(pick(sweep, model__placement="post")))
                    - mean(finals(pick(sweep, model__placement="pre"))))
    kind = abs(mean(finals(pick(sweep, norm__kind="rmsnorm"))) - mean(finals(pick(sweep, norm__kind="layernorm"))))
    return (f"|post − pre| = {placement:.3f} vs |RMSNorm − LayerNorm| = {kind:.3f} (final val loss)",
            placement > kind, {"placement": placement, "kind": kind})
