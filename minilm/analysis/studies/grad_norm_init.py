"""The gradient by layer at initialization, per placement and init (Xiong et al. 2020)."""

from collections.abc import Callable

from minilm.analysis.studies.common import NotMeasured, expect, listing, mean, pick, values_of
from minilm.analysis.sweep import Sweep


def _last_over_first(sweep: Sweep, placement: str, init: str) -> dict[int, float]:
    """{depth: last / first layer MLP gradient RMS at init}, seed means."""
    ratios = {}
    for depth in values_of(sweep, "model.n_layer", 1):
        runs = [r for r in pick(sweep, model__placement=placement, model__init=init, model__n_layer=depth)
                if "mlp" in r.init_grads]
        if not runs:
            raise NotMeasured(f"no gradients at init for {placement}-norm, {init} init, {depth} layers")
        ratios[depth] = mean(r.init_grads["mlp"][-1] for r in runs) / mean(r.init_grads["mlp"][0] for r in runs)
    return ratios


def _ratio_verdict(sweep: Sweep, placement: str, init: str, agrees: Callable[[float], bool], rule: str):
    ratios = _last_over_first(sweep, placement, init)
    return (f"last / first layer MLP gradient RMS {listing(list(ratios.values()), 2)} at {listing(list(ratios))} "
            f"layers ({rule})", all(agrees(r) for r in ratios.values()), {str(d): r for d, r in ratios.items()})


@expect("grad_norm_init", "Xavier init: post-norm's gradient grows with the layer index")
def _xavier_post(sweep: Sweep):
    return _ratio_verdict(sweep, "post", "xavier", lambda r: r > 1, "grows = above 1 at every depth")


@expect("grad_norm_init", "Xavier init: pre-norm's gradient does not grow with the layer index")
def _xavier_pre(sweep: Sweep):
    return _ratio_verdict(sweep, "pre", "xavier", lambda r: r <= 1, "does not grow = at most 1 at every depth")


@expect("grad_norm_init", "GPT-2 init: post-norm's gradient is flat across layers")
def _gpt2_post(sweep: Sweep):
    return _ratio_verdict(sweep, "post", "gpt2", lambda r: 0.8 <= r <= 1.25, "flat = within 0.8–1.25")


@expect("grad_norm_init", "GPT-2 init: pre-norm's gradient is largest at the first layer and decays")
def _gpt2_pre(sweep: Sweep):
    return _ratio_verdict(sweep, "pre", "gpt2", lambda r: r < 1, "decays = below 1 at every depth")


@expect("grad_norm_init", "a one-step study reports no divergence")
def _one_step_no_divergence(sweep: Sweep):
    diverged = sum(r.diverged for r in sweep.stats)
    return f"{diverged}/{len(sweep.stats)} runs diverged", diverged == 0, {"diverged": diverged}
