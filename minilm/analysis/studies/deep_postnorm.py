"""Deep post-norm fails where pre-norm and sandwich train (Wang et al. 2022; Ding et al. 2021)."""

from minilm.analysis.studies.common import expect, finals, listing, mean, pick, values_of
from minilm.analysis.sweep import Sweep


def _gap_to_rescued(sweep: Sweep, depth: int) -> tuple[float, dict]:
    loss = {p: mean(finals(pick(sweep, model__n_layer=depth, model__placement=p))) for p in ("post", "pre", "sandwich")}
    return loss["post"] - min(loss["pre"], loss["sandwich"]), loss


@expect("deep_postnorm", "at the largest depth post-norm stalls or diverges while pre-norm and sandwich train")
def _deep_post_fails(sweep: Sweep):
    depth = values_of(sweep, "model.n_layer", 1)[-1]
    gap, loss = _gap_to_rescued(sweep, depth)
    post = pick(sweep, model__n_layer=depth, model__placement="post")
    init = mean(r.init_loss for r in post if r.init_loss is not None)
    trained = all(loss[p] < init - 1 for p in ("pre", "sandwich"))
    fails = any(r.diverged for r in post) or gap >= 0.5
    return (f"{depth} layers: final val loss {loss['post']:.3f} (post), {loss['pre']:.3f} (pre), "
            f"{loss['sandwich']:.3f} (sandwich), {init:.2f} at init; post-norm fails = diverged or 0.5 above the "
            f"better rescue; trains = 1 below the loss at init", fails and trained, loss)


@expect("deep_postnorm", "post-norm's gap to the rescued placements grows with depth")
def _gap_grows(sweep: Sweep):
    depths = values_of(sweep, "model.n_layer")
    gaps = [_gap_to_rescued(sweep, d)[0] for d in depths]
    return (f"post − best rescue {listing(gaps, 3)} at {listing(depths)} layers", gaps[-1] > gaps[0],
            dict(zip(map(str, depths), gaps)))


@expect("deep_postnorm", "sandwich trains at least as well as pre-norm")
def _sandwich_vs_pre(sweep: Sweep):
    depths = values_of(sweep, "model.n_layer", 1)
    losses = [_gap_to_rescued(sweep, d)[1] for d in depths]
    deltas = [loss["sandwich"] - loss["pre"] for loss in losses]
    return (f"sandwich − pre {listing(deltas, 3)} at {listing(depths)} layers ('at least as well' = under 0.05)",
            all(d < 0.05 for d in deltas), dict(zip(map(str, depths), deltas)))
