"""What every study's verdicts share: the registry, the verdict, and what verdicts read.

A study's config (configs/experiment/<name>.yaml) holds what is data: its expected outcome in words,
the source, the figures. What is judged lives in its own module here (minilm/analysis/studies/<name>.py),
registered under the study's name with `@expect(study, claim)`: a function of the report's `Sweep`
returning (what was measured, whether it agrees, the numbers). When the runs lack what a verdict needs
(a partial sweep), it says so (`NotMeasured`) instead of guessing. Thresholds that turn a number into a
yes or no are named in the measured text, so a reader can judge them.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from minilm.analysis.sweep import LR_KEY, RunStats, Sweep, arm_label, lr_sensitivity

SAME_LOSS = 0.05  # nats: two arms whose mean final losses differ by less count as the same loss here


class NotMeasured(Exception):
    """The runs do not hold what a verdict needs."""


@dataclass
class Verdict:
    claim: str                  # the expectation, in words
    measured: str               # what the runs show, with the numbers
    passed: bool | None         # agrees with the expectation; None: not measurable from these runs
    numbers: dict = field(default_factory=dict)


Check = Callable[[Sweep], tuple[str, bool, dict]]
EXPECTATIONS: dict[str, list[tuple[str, Check]]] = {}


def expect(study: str, claim: str):
    """Register a verdict of `study` on `claim`."""
    def register(check: Check) -> Check:
        EXPECTATIONS.setdefault(study, []).append((claim, check))
        return check
    return register


def verdicts(study: str | None, sweep: Sweep) -> list[Verdict]:
    """Every registered verdict of the study on these runs (none for a sweep that is not a study)."""
    found = []
    for claim, check in EXPECTATIONS.get(study, []):
        try:
            measured, passed, numbers = check(sweep)
        except NotMeasured as why:
            measured, passed, numbers = f"not measured ({why})", None, {}
        found.append(Verdict(claim, measured, None if passed is None else bool(passed), numbers))
    return found


# ---------------------------------------------------------------- what verdicts read


def pick(sweep: Sweep, **where) -> list[RunStats]:
    """The runs with these config values (dotted keys written with __ for dots); NotMeasured when there are none."""
    where = {key.replace("__", "."): value for key, value in where.items()}
    runs = sweep.runs(where)
    if not runs:
        raise NotMeasured(f"no run with {', '.join(f'{k}={v}' for k, v in where.items())}")
    return runs


def values_of(sweep: Sweep, key: str, at_least: int = 2) -> list:
    values = [v for v in sweep.values(key) if v is not None]
    if len(values) < at_least:
        raise NotMeasured(f"{key} takes {len(values)} value(s) here, {at_least} needed")
    return values


def finals(runs: list[RunStats]) -> list[float]:
    """min(final val loss, loss at init) per run: a run without a final loss counts its loss at init."""
    values = [r.final_or_init for r in runs if r.final_or_init is not None]
    if not values:
        raise NotMeasured("no run has a loss")
    return values


def mean(values) -> float:
    values = list(values)
    if not values:
        raise NotMeasured("nothing to average")
    return statistics.fmean(values)


def sensitivity(sweep: Sweep, **where) -> float:
    """LR sensitivity of the runs with these values of the other swept keys."""
    if LR_KEY not in sweep.keys:
        raise NotMeasured("the learning rate is not swept")
    where = {key.replace("__", "."): value for key, value in where.items()}
    others = [k for k in sweep.keys if k != LR_KEY]
    if set(where) != set(others):
        raise NotMeasured(f"the LR sweep is not split by {', '.join(where)} alone")
    label = arm_label(tuple(where[k] for k in others), others)
    found = lr_sensitivity(sweep.arms, sweep.keys)
    if label not in found:
        raise NotMeasured(f"no LR sweep at {label}")
    return found[label][2]


def run_max(run: RunStats, prefix: str) -> float:
    """The largest value of a per-layer metric over the run's layers and sampled steps."""
    values = [max(v) for v in run.per_layer(prefix).values()]
    if not values:
        raise NotMeasured(f"{prefix} was not logged")
    return max(values)


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (no ties expected)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0] * len(values)
        for rank, i in enumerate(order):
            out[i] = rank
        return out
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def events(runs: list[RunStats]) -> int:
    """Runs that spiked or diverged."""
    return sum(r.diverged or bool(r.spikes) for r in runs)


def listing(values, digits: int | None = None) -> str:
    """Values joined by ' / ': with `digits` decimals, or in their shortest form (learning rates, eps)."""
    return " / ".join(f"{v:g}" if digits is None else f"{v:.{digits}f}" for v in values)


def sensitivity_by(sweep: Sweep, key: str) -> dict:
    """{value of `key`: LR sensitivity of its runs}, for a sweep of the learning rate and `key` alone."""
    return {value: sensitivity(sweep, **{key.replace(".", "__"): value}) for value in values_of(sweep, key)}
