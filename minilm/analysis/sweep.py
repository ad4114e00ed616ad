"""A sweep's statistics: runs grouped into arms, each arm's numbers with confidence intervals.

Arms are the values of the swept keys: the config keys whose values differ between runs,
except `seed`, so seeds pool. A key whose value follows from another swept key of the same
config group (e.g. optim.weight_decay from optim.independent_weight_decay, both set by one
optim option) is left out of the label; keys of different groups are always kept.

Per arm (arms.csv and report.md):
  final val loss   mean ± 95% CI over the seeds with a final loss (Student t, n-1 dof); a run
                   stopped by divergence, or ending non-finite, has none
  best val loss    the lowest val/loss any seed of the arm reached
  diverged         seeds that diverged / seeds; median step of divergence (minilm/train/divergence.py)
  spiked           seeds whose loss crossed the divergence line and came back / seeds; spikes in all
  fp16 skipped     steps skipped by the fp16 loss scaler, mean over seeds
  tokens/s         median over each run's logged windows, mean over seeds
When optim.lr is swept: LR sensitivity (Wortsman et al. 2023) per setting of the other swept
keys = mean over the LR grid of [min(final val loss, loss at init) - best of those over the
grid], where a seed without a final loss counts its loss at init (its step-1 train loss),
and each grid point is the mean over its seeds.
"""

import math
import re
import statistics
from dataclasses import dataclass

from minilm.analysis.runs import RunRecord
from minilm.rundir import flatten

LR_KEY = "optim.lr"
# Student t 97.5% quantiles for 1..30 degrees of freedom (two-sided 95% interval)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


GRAD_PARTS = ("attn", "mlp")


def t_critical(dof: int) -> float:
    """The 97.5% quantile of Student's t: tabulated to 30 dof, then the Cornish-Fisher expansion (error < 1e-4)."""
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% confidence interval); the half-width is None below two values."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), t_critical(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def difference_ci(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean(b) - mean(a), half-width of its 95% CI by Welch's t); the half-width is None below two values each."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return diff, t_critical(max(1, math.floor(dof))) * math.sqrt(va + vb)


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1), starting at the first value."""
    alpha, out = 2 / (span + 1), []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


@dataclass
class RunStats:
    record: RunRecord
    final_val: float | None      # the last val/loss; None if the run was stopped by divergence or ended non-finite
    best_val: float | None
    init_loss: float | None      # train/loss at step 1: the loss before any update
    diverged: bool
    diverged_at: int | None
    spikes: list[dict]           # crossings of the divergence line that came back (minilm/train/divergence.py)
    above_at_end: dict | None    # a crossing still open where the run stopped short of max_steps (or was logged
    #                              before judge_end, minilm/train/divergence.py): neither a spike nor a divergence
    skipped: float
    tokens_per_s: float | None
    curve: dict[int, float]
    init_grads: dict[str, list[float]]  # "attn"/"mlp" -> gradient RMS per layer at step 1

    @property
    def flat(self) -> dict:
        return flatten(self.record.config)

    @property
    def final_or_init(self) -> float | None:
        """min(final val loss, loss at init), a run without a final loss counting its loss at init
        (Wortsman et al. 2023's convention for LR sensitivity); None without a loss at init."""
        if self.init_loss is None:
            return None
        return min(self.final_val if self.final_val is not None else math.inf, self.init_loss)

    @property
    def stopped_early(self) -> bool:
        return self.record.summary.get("outcome") == "diverged"

    def series(self, metric: str) -> dict[int, float]:
        return {step: v for step, v in self.record.series(metric).items() if math.isfinite(v)}

    def per_layer(self, prefix: str) -> dict[int, list[float]]:
        """{step: [value of layer 0, 1, ...]} of a per-layer metric `prefix`/L{i}, at the steps every layer logged."""
        n_layer = self.record.config["model"]["n_layer"]
        layers = [self.series(f"{prefix}/L{i}") for i in range(n_layer)]
        steps = set.intersection(*(set(s) for s in layers)) if layers else set()
        return {step: [layer[step] for layer in layers] for step in sorted(steps)}


def _last(record: RunRecord, metric: str):
    """The summary's value of a metric, else its last logged value, else None."""
    if record.summary.get(metric) is not None:
        return record.summary[metric]
    series = record.series(metric)
    return series[max(series)] if series else None


def run_stats(record: RunRecord) -> RunStats:
    train, val = record.series("train/loss"), record.series("val/loss")
    bad_steps = [step for step, loss in sorted(train.items()) if not math.isfinite(loss)]
    diverged = bool(record.summary.get("diverged")) or bool(bad_steps)
    finite_val = {step: v for step, v in val.items() if math.isfinite(v)}
    # a run may cross the divergence line and go on (train.stop_on_divergence=false): only one that
    # was stopped there, or ends non-finite, has no final loss
    ended = record.summary.get("outcome") != "diverged" and bool(train) and math.isfinite(train[max(train)])
    first = train.get(min(train)) if train else None
    step_one = next((row for row in record.rows or () if row["step"] == 1), {})
    n_layer = record.config["model"]["n_layer"]
    grads = {part: [step_one.get(f"diag/grad_rms/L{i}.{part}") for i in range(n_layer)] for part in GRAD_PARTS}
    tokens = list(record.series("perf/tokens_per_s").values())
    return RunStats(
        record=record,
        final_val=val[max(val)] if ended and val and math.isfinite(val[max(val)]) else None,
        best_val=min(finite_val.values()) if finite_val else None,
        init_loss=first if first is not None and math.isfinite(first) else None,
        diverged=diverged,
        diverged_at=record.summary.get("diverged_at_step") or (bad_steps[0] if bad_steps else None),
        spikes=[s for s in record.summary.get("spikes") or () if s.get("recovered", True)],
        above_at_end=next((s for s in record.summary.get("spikes") or () if not s.get("recovered", True)), None),
        skipped=float(_last(record, "amp/skipped_steps") or 0),
        tokens_per_s=statistics.median(tokens) if tokens else None,
        curve={step: loss for step, loss in train.items() if math.isfinite(loss)},
        init_grads={part: values for part, values in grads.items() if None not in values},
    )


def swept_keys(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between runs (seed aside), minus those another swept key of the
    same config group determines (one option file sets both). A key left unset (None) in some runs determines
    nothing: its label would say None where the other key names the arm (precision.rounding of a bf16 run)."""
    flat = [flatten(c) for c in configs]
    keys = [k for k in dict.fromkeys(k for f in flat for k in f)
            if k != "seed" and len({repr(f.get(k)) for f in flat}) > 1]

    def determines(a: str, b: str) -> bool:
        mapping = {}
        return all(f.get(a) is not None and mapping.setdefault(repr(f.get(a)), repr(f.get(b))) == repr(f.get(b))
                   for f in flat)

    def group(key: str) -> str:
        return key.split(".", 1)[0]

    kept: list[str] = []
    for key in sorted(keys, key=lambda k: -len({repr(f.get(k)) for f in flat})):  # most values first
        if not any(group(other) == group(key) and determines(other, key) for other in kept):
            kept.append(key)
    return [k for k in keys if k in kept]  # in config order


def arm_label(arm: tuple, keys: list[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, arm)) or "all runs"


def sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def group_arms(stats: list[RunStats], keys: list[str]) -> dict[tuple, list[RunStats]]:
    arms: dict[tuple, list[RunStats]] = {}
    for s in stats:
        flat = s.flat
        arms.setdefault(tuple(flat.get(k) for k in keys), []).append(s)
    return dict(sorted(arms.items(), key=lambda item: [sort_key(v) for v in item[0]]))


def arm_row(label: str, runs: list[RunStats]) -> dict:
    finals = [r.final_val for r in runs if r.final_val is not None]
    mean, half = mean_ci(finals)
    steps = [r.diverged_at for r in runs if r.diverged and r.diverged_at is not None]
    return {
        "arm": label, "seeds": len(runs), "final_val_mean": mean, "final_val_ci95": half, "final_val_n": len(finals),
        "best_val": min((r.best_val for r in runs if r.best_val is not None), default=None),
        "diverged": sum(r.diverged for r in runs),
        "median_divergence_step": statistics.median(steps) if steps else None,
        "spiked": sum(bool(r.spikes) for r in runs), "spikes": sum(len(r.spikes) for r in runs),
        "fp16_skipped_steps": statistics.fmean(r.skipped for r in runs),
        "tokens_per_s": mean_or_none(r.tokens_per_s for r in runs),
    }


@dataclass
class Sweep:
    """The runs of a report with their swept keys: what figures and verdicts read."""

    stats: list[RunStats]
    keys: list[str]

    @property
    def arms(self) -> dict[tuple, list[RunStats]]:
        return group_arms(self.stats, self.keys)

    def runs(self, where: dict) -> list[RunStats]:
        """The runs whose config has every given {dotted key: value}."""
        return [s for s in self.stats if all(s.flat.get(k) == v for k, v in where.items())]

    def values(self, key: str) -> list:
        return sorted({s.flat.get(key) for s in self.stats}, key=sort_key)


def lr_curves(arms: dict[tuple, list[RunStats]], keys: list[str]) -> dict[tuple, dict[float, float]]:
    """{values of the other swept keys: {LR: mean over seeds of min(final val loss, loss at init)}}."""
    lr_index = keys.index(LR_KEY)
    families: dict[tuple, dict[float, float]] = {}
    for arm, runs in arms.items():
        losses = [r.final_or_init for r in runs if r.final_or_init is not None]
        if losses:
            family = families.setdefault(arm[:lr_index] + arm[lr_index + 1:], {})
            family[float(arm[lr_index])] = statistics.fmean(losses)
    return families


def lr_sensitivity(arms: dict[tuple, list[RunStats]], keys: list[str]) -> dict[str, tuple[list, list, float]]:
    """{setting of the other swept keys: (LRs, per-LR loss, LR sensitivity)} (Wortsman et al. 2023)."""
    others = [k for k in keys if k != LR_KEY]
    result = {}
    for family, per_lr in lr_curves(arms, keys).items():
        lrs = sorted(per_lr)
        losses = [per_lr[lr] for lr in lrs]
        best = min(losses)
        result[arm_label(family, others)] = (lrs, losses, statistics.fmean(loss - best for loss in losses))
    return result


GROUP_ORDER = re.compile(r"L(\d+)\.(\w+)")


def group_key(group: str) -> tuple:
    """embed, L0.attn, L0.mlp, L0.norm, L1.attn, ..., final_norm, head."""
    match = GROUP_ORDER.fullmatch(group)
    if match:
        return (1, int(match[1]), match[2])
    return (0 if group == "embed" else 2, 0, group)


def mean_by_group(run: RunStats, prefix: str) -> dict[str, float]:
    """{parameter group: mean over the sampled steps after step 1 of `prefix`<group>}."""
    values: dict[str, list[float]] = {}
    for row in run.record.rows or ():
        if row["step"] > 1:
            for key, v in row.items():
                if key.startswith(prefix) and math.isfinite(float(v)):
                    values.setdefault(key[len(prefix):], []).append(float(v))
    return {g: statistics.fmean(v) for g, v in values.items()}


def probe_points(run: RunStats, metric: str, family: str) -> dict[float, float]:
    """{probe std: error} of the norm probe at the first step that logged it."""
    prefix = f"diag/{metric}/{family}/"
    row = next((r for r in run.record.rows or () if any(k.startswith(prefix) for k in r)), {})
    return {float(k[len(prefix):]): float(v) for k, v in row.items() if k.startswith(prefix)}

