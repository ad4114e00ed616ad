"""Pure bf16 training without an fp32 master copy: nearest, stochastic, Kahan (Zamirai et al. 2020)."""

from minilm.analysis.studies.common import SAME_LOSS, NotMeasured, expect, finals, mean, pick
from minilm.analysis.sweep import Sweep


def _pure_gap(sweep: Sweep, rounding: str) -> tuple[float, float, float]:
    """(mean final loss of pure bf16 with `rounding`, of the fp32-master arm, their difference)."""
    pure = mean(finals(pick(sweep, precision__rounding=rounding)))
    master = mean(finals(pick(sweep, precision__name="bf16")))
    return pure, master, pure - master


@expect("bf16_pure", "round-to-nearest stalls: it ends above the fp32-master loss")
def _nearest_stalls(sweep: Sweep):
    pure, master, gap = _pure_gap(sweep, "nearest")
    return (f"final val loss {pure:.3f} (nearest) vs {master:.3f} (fp32 master weights): {gap:+.3f} (stalls = more "
            f"than {SAME_LOSS} above)", gap > SAME_LOSS, {"nearest": pure, "master": master, "gap": gap})


def _recovers(rounding: str):
    def check(sweep: Sweep):
        pure, master, gap = _pure_gap(sweep, rounding)
        return (f"final val loss {pure:.3f} ({rounding}) vs {master:.3f} (fp32 master weights): {gap:+.3f} "
                f"(recovered = less than {SAME_LOSS} above)", gap < SAME_LOSS, {rounding: pure, "master": master})
    return check


expect("bf16_pure", "stochastic rounding recovers the fp32-master loss")(_recovers("stochastic"))
expect("bf16_pure", "Kahan summation recovers the fp32-master loss")(_recovers("kahan"))


@expect("bf16_pure", "memory per parameter falls from 16 bytes to 8 (10 with the Kahan buffer)")
def _bytes_per_param(sweep: Sweep):
    def measured(**where):
        values = {r.series("mem/bytes_per_param").get(1) for r in pick(sweep, **where)} - {None}
        if not values:
            raise NotMeasured("mem/bytes_per_param was not logged")
        return max(values)

    found = {"fp32 master": measured(precision__name="bf16"), "nearest": measured(precision__rounding="nearest"),
             "stochastic": measured(precision__rounding="stochastic"), "kahan": measured(precision__rounding="kahan")}
    expected = {"fp32 master": 16, "nearest": 8, "stochastic": 8, "kahan": 10}
    return (", ".join(f"{arm} {value:g}" for arm, value in found.items()) + " bytes per parameter", found == expected,
            found)
