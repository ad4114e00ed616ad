"""The attention sink, and the sigmoid gate on the attention output that removes it (Qiu et al. 2025)."""

from minilm.analysis.studies.common import NotMeasured, difference, expect, interval, pick
from minilm.analysis.sweep import RunStats, Sweep


def _sink(run: RunStats) -> tuple[float, float]:
    """(the strongest layer's attention on the first token at the first sampled step, at the last one)."""
    sink = run.per_layer("diag/attn_sink")
    if len(sink) < 2:
        raise NotMeasured("diag/attn_sink was not sampled twice")
    return max(sink[min(sink)]), max(sink[max(sink)])


def _growth(runs: list[RunStats]) -> list[float]:
    return [end - start for start, end in map(_sink, runs)]


def _shown(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:+.3f}" + (f" ± {half:.3f}" if half is not None else " (one seed: no interval)")


@expect("attention_sink", "without the gate the share of attention on the first token grows during training")
def _grows(sweep: Sweep):
    runs = pick(sweep, model__attn_gate=False)
    growth = _growth(runs)
    mean, half = interval(growth)
    starts, ends = zip(*map(_sink, runs))
    return (f"strongest layer's attention on the first token {min(starts):.3f}–{max(starts):.3f} at step 1, "
            f"{min(ends):.3f}–{max(ends):.3f} at the end: end − start {_shown(growth)} (grows = the interval above "
            f"0)", half is not None and mean - half > 0, {"growth": mean, "ci95": half})


@expect("attention_sink", "with the gate the share of attention on the first token does not grow")
def _gate_holds(sweep: Sweep):
    runs = pick(sweep, model__attn_gate=True)
    growth = _growth(runs)
    mean, half = interval(growth)
    return (f"with the gate, strongest layer's attention on the first token end − start {_shown(growth)} (does not "
            f"grow = the interval not above 0)", half is not None and mean - half <= 0, {"growth": mean, "ci95": half})


@expect("attention_sink", "the gated model ends with less attention on the first token than the ungated one")
def _gate_lowers(sweep: Sweep):
    ends = {gate: [end for _, end in map(_sink, pick(sweep, model__attn_gate=gate))] for gate in (False, True)}
    diff, half = difference(ends[False], ends[True])
    if half is None:
        raise NotMeasured("fewer than two seeds per arm")
    return (f"strongest layer's attention on the first token at the end, gated − ungated {diff:+.3f} ± {half:.3f} "
            f"(less = the interval below 0)", diff + half < 0, {"difference": diff, "ci95": half})
