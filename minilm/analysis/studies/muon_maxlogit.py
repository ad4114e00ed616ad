"""The per-head max attention logit under Muon, and the two bounds on it: QK-clip and qk-norm (Kimi K2, 2025)."""

from minilm.analysis.studies.common import (
    NotMeasured,
    difference,
    expect,
    finals,
    interval,
    listing,
    mean,
    pick,
    values_of,
)
from minilm.analysis.sweep import LR_KEY, RunStats, Sweep

SLACK = 1.1  # a clipped run's sampled max logit may exceed tau by this factor: the diagnostic batch is not the one
#              the clip measured, and one more update lands before it is sampled
BOUNDS = {"none": {"model.qk_norm": False, "optim.qk_clip_tau": None}, "qk_norm": {"model.qk_norm": True}}


def _runs(sweep: Sweep, optimizer: str, bound: str, lr: float) -> list[RunStats]:
    where = {"optim.name": optimizer, LR_KEY: lr, **BOUNDS.get(bound, {"model.qk_norm": False})}
    runs = pick(sweep, **{k.replace(".", "__"): v for k, v in where.items()})
    if bound == "qk_clip":
        runs = [r for r in runs if r.flat.get("optim.qk_clip_tau") is not None]
        if not runs:
            raise NotMeasured(f"no {optimizer} run with QK-clip at lr {lr:g}")
    return runs


def _peak(run: RunStats) -> dict[int, float]:
    """{sampled step: the max attention logit over layers and heads}."""
    peak = {step: max(values) for step, values in run.per_layer("diag/attn_logit_max").items()}
    if len(peak) < 3:
        raise NotMeasured("diag/attn_logit_max was sampled fewer than 3 times")
    return peak


def _end(run: RunStats) -> float:
    """The max logit at the last sampled step."""
    peak = _peak(run)
    return peak[max(peak)]


def _late_growth(run: RunStats) -> float:
    """The max logit at the last sampled step minus at the sampled step nearest the middle of the run."""
    peak = _peak(run)
    middle = min(peak, key=lambda step: abs(step - max(peak) / 2))
    return _end(run) - peak[middle]


def _growth_text(sweep: Sweep, optimizer: str, bound: str) -> tuple[str, list[bool], list[bool]]:
    """(per LR: the end max logit and the late growth with its interval; grows (interval above 0); does not)."""
    shown, grows, holds = [], [], []
    for lr in values_of(sweep, LR_KEY):
        runs = _runs(sweep, optimizer, bound, lr)
        diff, half = interval([_late_growth(r) for r in runs])
        if half is None:
            raise NotMeasured("fewer than two seeds per arm")
        grows.append(diff - half > 0)
        holds.append(diff - half <= 0)
        shown.append(f"lr {lr:g}: {mean(map(_end, runs)):.2f} at the end, "
                     f"{diff:+.2f} ± {half:.2f} over the second half")
    return "; ".join(shown), grows, holds


@expect("muon_maxlogit", "under Muon without qk-norm the per-head max attention logit keeps growing")
def _keeps_growing(sweep: Sweep):
    shown, grows, _ = _growth_text(sweep, "muon", "none")
    contrast, _, _ = _growth_text(sweep, "adamw", "none")
    return (f"Muon, no bound: {shown} (keeps growing = the interval above 0 at every LR); AdamW, no bound, for "
            f"comparison: {contrast}", all(grows), {"grows": grows})


def _first_clip(run: RunStats) -> int | None:
    """The first logged step at which QK-clip scaled some head down (None: never)."""
    return min((step for step, n in run.series("optim/qk_clipped_heads").items() if n > 0), default=None)


def _clip_engaged(sweep: Sweep) -> list[float]:
    """The learning rates at which QK-clip scaled some head down in some Muon run."""
    engaged = [lr for lr in values_of(sweep, LR_KEY)
               if any(_first_clip(r) is not None for r in _runs(sweep, "muon", "qk_clip", lr))]
    if not engaged:
        raise NotMeasured("QK-clip never engaged under Muon (optim/qk_clipped_heads stayed 0)")
    return engaged


@expect("muon_maxlogit", "under Muon QK-clip caps the max attention logit at tau")
def _caps(sweep: Sweep):
    shown, capped = [], True
    for lr in _clip_engaged(sweep):
        runs = _runs(sweep, "muon", "qk_clip", lr)
        tau = runs[0].flat["optim.qk_clip_tau"]
        first = min(step for step in map(_first_clip, runs) if step is not None)
        top = max(max((v for step, v in _peak(r).items() if step > first), default=0.0) for r in runs)
        unclipped = max(max(_peak(r).values()) for r in _runs(sweep, "muon", "none", lr))
        capped &= top <= SLACK * tau
        shown.append(f"lr {lr:g}: tau {tau:g}, first clip at step {first}, largest sampled max logit after it "
                     f"{top:.2f} (unclipped arm: {unclipped:.2f})")
    return (f"{'; '.join(shown)} (caps = at most {SLACK:g} × tau)", capped, {})


@expect("muon_maxlogit", "under Muon QK-clip costs no loss")
def _clip_free(sweep: Sweep):
    shown, free = [], True
    for lr in _clip_engaged(sweep):
        diff, half = difference(finals(_runs(sweep, "muon", "none", lr)), finals(_runs(sweep, "muon", "qk_clip", lr)))
        if half is None:
            raise NotMeasured("fewer than two seeds per arm")
        free &= diff - half <= 0
        shown.append(f"lr {lr:g}: {diff:+.3f} ± {half:.3f}")
    return (f"final val loss with QK-clip minus without, at the LRs where it engaged: {'; '.join(shown)} (no cost = "
            f"the interval not above 0)", free, {})


@expect("muon_maxlogit", "under Muon qk-norm bounds the max attention logit too: it does not keep growing")
def _qk_norm_bounds(sweep: Sweep):
    shown, _, holds = _growth_text(sweep, "muon", "qk_norm")
    unbounded = [mean(map(_end, _runs(sweep, "muon", "none", lr))) for lr in values_of(sweep, LR_KEY)]
    return (f"Muon with qk-norm: {shown} (bounded = the interval not above 0 at every LR; the unbounded arm ends at "
            f"{listing(unbounded, 2)})", all(holds), {"bounded": holds})
