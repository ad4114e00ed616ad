"""What every study's verdicts share: the registry, the verdict, and what verdicts read.

A study's config (configs/experiment/<name>.yaml) holds what is data: its expected outcome in words,
the source, the figures. What is judged lives in its own module here (minilm/analysis/studies/<name>.py),
registered under the study's name with `@expect(study, claim)`: a function of the report's `Sweep`
returning (what was measured, whether it agrees, the numbers). When the runs lack what a verdict needs
(a partial sweep), it says so (`NotMeasured`) instead of guessing. Thresholds that turn a number into a
yes or no are named in the measured text, so a reader can judge them.

The seed rule, applied here to every verdict of every study: a verdict on a sweep of two arms or more
says how many seeds its arms rest on (the fewest of any arm). Below 3 it is an observation and says so
("single-seed observation"); from 3 seeds on, it says whether it gives an interval, and the
interval is always the same: the 95% Student-t interval over the seeds (`interval`, `difference`:
mean ± t·s/√n, Welch's for a difference). Why t and not the seeds' min–max: the arms table reports the
same interval, its coverage is stated (95% for the mean under normal seed noise), and at n = 3 it is
honest about how little 3 seeds pin down (t = 4.30), where a min–max range of 3 seeds covers the median
seed only 75% of the time (1 − 2·0.5³).
"""

import statistics
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from minilm.analysis.sweep import LR_KEY, RunStats, Sweep, arm_label, difference_ci, lr_sensitivity, mean_ci

MIN_SEEDS = 3  # seeds per arm a comparison of arms rests on; fewer: an observation

SAME_LOSS = 0.05  # nats: two arms whose mean final losses differ by less count as the same loss here


class NotMeasured(Exception):
    """The runs do not hold what a verdict needs."""


@dataclass
class Verdict:
    claim: str                  # the expectation, in words
    measured: str               # what the runs show, with the numbers
    passed: bool | None         # agrees with the expectation; None: not measurable from these runs
    numbers: dict = field(default_factory=dict)
    seeds: int | None = None    # the fewest seeds of any arm of the sweep; None: a sweep of one arm


Check = Callable[[Sweep], tuple[str, bool, dict]]
EXPECTATIONS: dict[str, list[tuple[str, Check]]] = {}


def expect(study: str, claim: str):
    """Register a verdict of `study` on `claim`."""
    def register(check: Check) -> Check:
        EXPECTATIONS.setdefault(study, []).append((claim, check))
        return check
    return register


_GAVE_INTERVAL: ContextVar[bool] = ContextVar("gave_interval", default=False)  # set by interval, difference


def verdicts(study: str | None, sweep: Sweep) -> list[Verdict]:
    """Every registered verdict of the study on these runs (none for a sweep that is not a study)."""
    arms = sweep.arms
    seeds = min(len(runs) for runs in arms.values()) if len(arms) > 1 else None
    found = []
    for claim, check in EXPECTATIONS.get(study, []):
        token = _GAVE_INTERVAL.set(False)
        try:
            measured, passed, numbers = check(sweep)
            measured += seed_note(seeds, _GAVE_INTERVAL.get())
        except NotMeasured as why:
            measured, passed, numbers = f"not measured ({why})", None, {}
        finally:
            _GAVE_INTERVAL.reset(token)
        found.append(Verdict(claim, measured, None if passed is None else bool(passed), numbers, seeds))
    return found


def seed_note(seeds: int | None, gave_interval: bool) -> str:
    """The seed rule's words at the end of a verdict (module docstring)."""
    if seeds is None:
        return ""
    if seeds < MIN_SEEDS:
        return " — single-seed observation" if seeds == 1 else f" — {seeds}-seed observation (fewer than {MIN_SEEDS})"
    how = "intervals: 95% Student t over the seeds" if gave_interval else "seed means, no interval"
    return f" ({seeds} seeds per arm; {how})"


def interval(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% Student-t interval over the seeds; None below two values)."""
    _GAVE_INTERVAL.set(True)
    return mean_ci(values)


def difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean(b) − mean(a), half-width of its 95% Welch t interval; None below two values each)."""
    _GAVE_INTERVAL.set(True)
    return difference_ci(a, b)


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
