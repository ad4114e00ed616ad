"""DyT against LayerNorm and RMSNorm at two token budgets (Zhu et al. 2025; arXiv 2604.23434)."""

from minilm.analysis.studies.common import difference, expect, finals, mean, pick, values_of
from minilm.analysis.sweep import Sweep

NORMS = ("layernorm", "rmsnorm", "dyt")


def _gap(sweep: Sweep, steps: int, other: str = "layernorm") -> tuple[float, float | None]:
    """DyT's final val loss minus `other`'s at `steps` steps: (difference of the seed means, 95% half-width)."""
    return difference(finals(pick(sweep, norm__kind=other, train__max_steps=steps)),
                      finals(pick(sweep, norm__kind="dyt", train__max_steps=steps)))


def _parity(budget: int):
    def check(sweep: Sweep):
        steps = values_of(sweep, "train.max_steps")[budget]
        diff, half = _gap(sweep, steps)
        shown = f"± {half:.3f}" if half is not None else "(one seed each: no interval)"
        return (f"at {steps} steps DyT − LayerNorm = {diff:+.3f} {shown} (final val loss; matches = the interval "
                f"holds 0)", half is not None and abs(diff) <= half, {"steps": steps, "difference": diff,
                                                                       "ci95": half})
    return check


expect("dyt", "at the shorter token budget DyT matches LayerNorm within the seeds' interval")(_parity(0))
expect("dyt", "at the longer token budget DyT matches LayerNorm within the seeds' interval")(_parity(-1))


@expect("dyt", "which of DyT and LayerNorm ends lower changes between the two budgets")
def _sign_flips(sweep: Sweep):
    budgets = values_of(sweep, "train.max_steps")
    short, long = budgets[0], budgets[-1]
    gaps = {steps: _gap(sweep, steps) for steps in (short, long)}
    winners = []
    for steps in (short, long):
        means = {kind: mean(finals(pick(sweep, norm__kind=kind, train__max_steps=steps)))
                 for kind in NORMS}
        best = min(means, key=means.get)
        diff, half = gaps[steps]
        resolved = half is not None and abs(diff) > half
        winners.append(f"at {steps} steps lowest {best} ({' / '.join(f'{means[k]:.3f}' for k in NORMS)} for "
                       f"{' / '.join(NORMS)}), DyT − LayerNorm {diff:+.3f}"
                       + (f" ± {half:.3f} ({'resolved' if resolved else 'not resolved'})" if half is not None else ""))
    flips = (gaps[short][0] > 0) != (gaps[long][0] > 0)
    return ("; ".join(winners) + " (changes = the sign of DyT − LayerNorm differs)", flips,
            {str(steps): gap for steps, gap in gaps.items()})
