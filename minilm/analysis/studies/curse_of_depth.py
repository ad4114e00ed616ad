"""The curse of depth in pre-norm models, and LayerNorm Scaling (Sun et al. 2025)."""

from minilm.analysis.studies.common import (
    NotMeasured,
    difference,
    expect,
    interval,
    listing,
    mean,
    pick,
    rank_correlation,
)
from minilm.analysis.sweep import RunStats, Sweep

LITTLE = 0.5  # the deepest third's mean skip-dloss below this share of the first third's: "contributes little"


def _at_end(run: RunStats, prefix: str) -> list[float]:
    """The per-layer values of `prefix` at the last step that logged every layer."""
    values = run.per_layer(prefix)
    if not values:
        raise NotMeasured(f"{prefix} was not logged")
    return values[max(values)]


def _variance_growth(run: RunStats) -> float:
    """The last block's residual variance over the first block's, at the end of the run."""
    variance = _at_end(run, "diag/resid_var")
    return variance[-1] / variance[0]


def _thirds(run: RunStats) -> tuple[float, float]:
    """(mean skip-dloss of the first third of the blocks, of the deepest third) at the last evaluation."""
    dloss = _at_end(run, "diag/block_skip_dloss")
    third = max(1, len(dloss) // 3)
    return mean(dloss[:third]), mean(dloss[-third:])


def _runs(sweep: Sweep, scaled: bool) -> list[RunStats]:
    return pick(sweep, norm__depth_scaling=scaled)


@expect("curse_of_depth", "without LayerNorm Scaling the residual stream's variance grows with depth")
def _variance_grows(sweep: Sweep):
    runs = _runs(sweep, False)
    rhos = [rank_correlation(list(range(len(v))), v) for v in (_at_end(r, "diag/resid_var") for r in runs)]
    growth, half = interval([_variance_growth(r) for r in runs])
    shown = f"{growth:.2f}" + (f" ± {half:.2f}" if half is not None else "")
    return (f"last / first block residual variance at the end {shown}; rank correlation of the variance with the "
            f"block index {listing(rhos, 2)} per seed (grows = the seed mean above 0.5)", mean(rhos) > 0.5,
            {"growth": growth, "ci95": half, "rho": rhos})


@expect("curse_of_depth", "without LayerNorm Scaling skipping one of the deepest blocks barely moves the loss")
def _deep_blocks_idle(sweep: Sweep):
    thirds = [_thirds(r) for r in _runs(sweep, False)]
    first, deep = mean(t[0] for t in thirds), mean(t[1] for t in thirds)
    return (f"val loss rise when one block is skipped, mean over the first third of the blocks {first:.3f}, over "
            f"the deepest third {deep:.3f} (little = the deepest under {LITTLE:g} × the first)", deep < LITTLE * first,
            {"first_third": first, "deepest_third": deep})


@expect("curse_of_depth", "LayerNorm Scaling holds the growth of the residual variance down")
def _scaling_holds_variance(sweep: Sweep):
    diff, half = difference([_variance_growth(r) for r in _runs(sweep, False)],
                            [_variance_growth(r) for r in _runs(sweep, True)])
    if half is None:
        raise NotMeasured("fewer than two seeds per arm")
    return (f"last / first block residual variance with scaling minus without {diff:+.2f} ± {half:.2f} (held down "
            f"= the interval below 0)", diff + half < 0, {"difference": diff, "ci95": half})


@expect("curse_of_depth", "LayerNorm Scaling gives the deepest blocks a larger share of the loss")
def _scaling_restores(sweep: Sweep):
    without = [_thirds(r)[1] for r in _runs(sweep, False)]
    with_scaling = [_thirds(r)[1] for r in _runs(sweep, True)]
    diff, half = difference(without, with_scaling)
    if half is None:
        raise NotMeasured("fewer than two seeds per arm")
    return (f"mean skip-dloss of the deepest third {mean(without):.3f} without scaling, {mean(with_scaling):.3f} "
            f"with: {diff:+.3f} ± {half:.3f} (larger = the interval above 0)", diff - half > 0,
            {"difference": diff, "ci95": half})
