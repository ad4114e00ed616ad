"""Compare the arms of a sweep: a Markdown summary, a table and figures, offline from local run dirs.

    minilm-report multirun/<date>/<time>             # any dir holding run dirs
    minilm-report ENTITY/minilm --group 'experiment=lr_qknorm'   # W&B runs whose group matches
    minilm-report SOURCE --out DIR                     # default: SOURCE/report

Arms are the values of the swept keys: the config keys whose values differ between runs,
except `seed`, so seeds pool. A key whose value follows from another swept key of the same
config group (e.g. optim.weight_decay from optim.independent_weight_decay, both set by one
optim option) is left out of the label; keys of different groups are always kept.

A canned study's runs carry its `study` node (minilm/config.py StudyConfig): the expected
outcome and its source open report.md, followed by one verdict per expectation computed from
the runs (minilm/analysis/studies.py); the study's `figures` are drawn, with one panel per value of its
`panel` key. A plain sweep gets the loss curves, plus the LR figure when optim.lr is swept,
the gradients at init when model.placement or model.n_layer is, and the fp16 scaler when an
fp16 run is present. A figure without data is not drawn, and report.md says so.

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

Every curve is the mean over an arm's seeds with a min-max band; `n=` counts the seeds that
contribute, and a run that stopped early ends with a cross. Train loss is smoothed by an
exponential moving average drawn over the faint raw curves of the seeds.
"""

import argparse
import csv
import io
import math
import re
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402  (after choosing the non-interactive backend)
import matplotlib.pyplot as plt  # noqa: E402

from minilm.analysis.runs import (  # noqa: E402
    RunRecord,
    fetch_wandb_runs,
    find_run_dirs,
    flatten,
    is_wandb_path,
    load_run_dir,
)
from minilm.config import FIGURES  # noqa: E402
from minilm.errors import SourceError, exit_on_input_error  # noqa: E402

LR_KEY = "optim.lr"
# Student t 97.5% quantiles for 1..30 degrees of freedom (two-sided 95% interval)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
GRAD_PARTS = ("attn", "mlp")
GRAD_KEYS = {"model.placement", "model.n_layer"}  # sweeps whose gradients at init the report plots by layer
DPI = 90
LOG_SPAN = 100  # a quantity whose max / min exceeds this gets a log axis


# ---------------------------------------------------------------- statistics


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


# ---------------------------------------------------------------- one run


@dataclass
class RunStats:
    record: RunRecord
    final_val: float | None      # the last val/loss; None if the run was stopped by divergence or ended non-finite
    best_val: float | None
    init_loss: float | None      # train/loss at step 1: the loss before any update
    diverged: bool
    diverged_at: int | None
    spikes: list[dict]           # crossings of the divergence line that came back (minilm/train/divergence.py)
    above_at_end: dict | None    # a crossing still open when the run ended: neither a spike nor a divergence
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


# ---------------------------------------------------------------- arms


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


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def group_arms(stats: list[RunStats], keys: list[str]) -> dict[tuple, list[RunStats]]:
    arms: dict[tuple, list[RunStats]] = {}
    for s in stats:
        flat = s.flat
        arms.setdefault(tuple(flat.get(k) for k in keys), []).append(s)
    return dict(sorted(arms.items(), key=lambda item: [_sort_key(v) for v in item[0]]))


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
        return sorted({s.flat.get(key) for s in self.stats}, key=_sort_key)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    header = ("| arm | seeds | final val loss (mean ± 95% CI) | best val loss | diverged | median divergence step "
              "| spiked (spikes) | fp16 skipped steps | tokens/s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        final = _fmt(r["final_val_mean"])
        if r["final_val_ci95"] is not None:
            final += f" ± {r['final_val_ci95']:.4f}"
        if r["final_val_n"] != r["seeds"]:
            final += f" (n={r['final_val_n']})"
        lines.append(f"| {r['arm']} | {r['seeds']} | {final} | {_fmt(r['best_val'])} | {r['diverged']}/{r['seeds']} "
                     f"| {_fmt(r['median_divergence_step'])} | {r['spiked']}/{r['seeds']} ({r['spikes']}) "
                     f"| {_fmt(r['fp16_skipped_steps'], 1)} | {_fmt(r['tokens_per_s'], 0)} |")
    return header + "\n".join(lines) + "\n"


def spike_lines(sweep: Sweep) -> list[str]:
    """One line per run that spiked, or ended above the divergence line: each crossing's step, peak, steps above."""
    lines = []
    for arm, runs in sweep.arms.items():
        for r in runs:
            crossings = [f"step {s['step']}: peak {s['peak']:.2f}, {s['steps_above']} steps above" for s in r.spikes]
            if r.above_at_end:
                s = r.above_at_end
                crossings.append(f"above the line from step {s['step']} to the end ({s['steps_above']} steps, peak "
                                 f"{s['peak']:.2f}): shorter than the window, so no divergence")
            if crossings:
                lines.append(f"- {arm_label(arm, sweep.keys)}, seed {r.flat.get('seed')}: {'; '.join(crossings)}")
    return lines


# ---------------------------------------------------------------- learning-rate sensitivity


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


# ---------------------------------------------------------------- layout: panels and colours


@dataclass
class Layout:
    """One panel per value of the panel key; within a panel one line per arm, coloured by the arm's values
    of the other swept keys (its series), the same colour in every figure."""

    keys: list[str]
    panel: str | None
    panels: list = field(default_factory=lambda: [None])
    colours: dict = field(default_factory=dict)

    @classmethod
    def of(cls, sweep: Sweep, declared: str | None) -> "Layout":
        keys = sweep.keys
        panel = declared if declared in keys else (LR_KEY if LR_KEY in keys else (keys[0] if len(keys) > 1 else None))
        layout = cls(keys, panel, sweep.values(panel) if panel else [None])
        series = sorted({layout.series(arm) for arm in sweep.arms}, key=lambda s: [_sort_key(v) for v in s])
        cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
        layout.colours = {s: cmap(i % cmap.N) for i, s in enumerate(series)}
        return layout

    def series(self, arm: tuple) -> tuple:
        return tuple(v for k, v in zip(self.keys, arm) if k != self.panel)

    def panel_of(self, arm: tuple):
        return arm[self.keys.index(self.panel)] if self.panel else None

    def panel_title(self, value) -> str:
        return f"{self.panel}={value}" if self.panel else ""


def write_png(fig, path: Path) -> None:
    """Save and close a figure as a 256-colour PNG: a third of the bytes of a full-colour one, the same look."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)


def _use_log(values) -> bool:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


class Canvas:
    """A grid of axes, rows x panels (one row of panels wraps at 4), and one legend for the whole figure:
    a colour per series, the same in every figure of the report; the panel key names each panel; `n` says
    how many seeds stand behind each curve (in the legend when it is the same for every curve, else at the
    end of each curve)."""

    def __init__(self, layout: Layout, n_rows: int, width: float = 3.9, height: float = 2.9):
        self.layout, self.curves = layout, []
        n_panels = len(layout.panels)
        cols = min(4, n_panels) if n_rows == 1 else n_panels
        lines = math.ceil(n_panels / cols) if n_rows == 1 else n_rows
        self.fig, axes = plt.subplots(lines, cols, figsize=(max(6.5, width * cols), height * lines + 1.2),
                                      squeeze=False, sharey=True if n_rows == 1 else "row")  # room for the legend
        if n_rows == 1:
            self.axes = [[axes[i // cols][i % cols] for i in range(n_panels)]]
            for ax in axes.flat[n_panels:]:
                ax.set_visible(False)
        else:
            self.axes = [list(row) for row in axes]

    def ax(self, row: int, arm: tuple):
        return self.axes[row][self.layout.panels.index(self.layout.panel_of(arm))]

    def curve(self, row: int, arm: tuple, x: list, y: list, n: str, **style):
        """Draw one arm's curve in its colour; `n` is its seed count label (e.g. n=3, n=3→1 from step 45)."""
        ax = self.ax(row, arm)
        ax.plot(x, y, color=self.layout.colours[self.layout.series(arm)], **style)
        self.curves.append((ax, arm, x[-1], y[-1], n))
        return ax

    def label_axes(self, row: int, title: str, **axis) -> None:
        for col, ax in enumerate(self.axes[row]):
            ax.set(**axis)
            ax.set_title(" — ".join(filter(None, [self.layout.panel_title(self.layout.panels[col]), title])),
                         fontsize=9)
            ax.grid(alpha=0.3)

    def save(self, title: str, path: Path) -> None:
        layout = self.layout
        series_keys = [k for k in layout.keys if k != layout.panel]
        shown = sorted({layout.series(arm) for _, arm, *_ in self.curves}, key=lambda s: [_sort_key(v) for v in s])
        counts = {n for *_, n in self.curves}
        notes = [f"panels: {layout.panel}"] if layout.panel else []
        if len(counts) == 1:
            notes.append(f"{counts.pop()} per curve")
        else:  # curves differ in n: each says its own
            for ax, arm, x, y, n in self.curves:
                ax.annotate(n, (x, y), fontsize=6, color=layout.colours[layout.series(arm)],
                            xytext=(2, 2), textcoords="offset points")
        handles = [matplotlib.lines.Line2D([], [], color=layout.colours[s], lw=2) for s in shown]
        ncol = min(3, len(handles))
        legend_rows = math.ceil(len(handles) / ncol)
        self.fig.legend(handles, [arm_label(s, series_keys) for s in shown], loc="lower center", ncol=ncol,
                        fontsize=7.5, title="; ".join(notes) or None, title_fontsize=7.5, frameon=False)
        height = self.fig.get_figheight()
        self.fig.suptitle(textwrap.fill(title, int(self.fig.get_figwidth() * 12)), fontsize=9.5)
        self.fig.tight_layout(rect=(0, (0.3 + 0.2 * legend_rows) / height, 1, 1 - 0.35 / height))
        write_png(self.fig, path)


@dataclass
class StepRow:
    """One row of a figure over training steps: a value per step for each run."""

    title: str
    ylabel: str
    values: Callable[[RunStats], dict[int, float]]
    smooth: bool = False        # EMA over the faint raw curves (per-step metrics)
    top: float | None = None    # clip the axis here (the train loss: spikes would flatten every curve)


def n_label(steps: list[int], series: list[dict[int, float]]) -> str:
    """n= the seeds behind a curve; where fewer contribute later, from which step and how many at the end."""
    counts = [sum(step in s for s in series) for step in steps]
    full = max(counts)
    fewer = next((s for s, n in zip(steps, counts) if n < full), None)
    return f"n={full}" if fewer is None else f"n={full}→{counts[-1]} from step {fewer}"


def plot_over_steps(sweep: Sweep, layout: Layout, rows: list[StepRow], title: str, path: Path) -> bool:
    """rows x panels; in each panel one curve per arm: the mean over seeds, a min-max band, n per step."""
    if not any(len(row.values(r)) > 1 for row in rows for r in sweep.stats):
        return False  # nothing has two points: a one-step sweep, or the metric was not logged
    canvas = Canvas(layout, len(rows))
    for i, row in enumerate(rows):
        plotted = []
        for arm, runs in sweep.arms.items():
            pairs = [(r, row.values(r)) for r in runs]
            pairs = [(r, s) for r, s in pairs if s]
            if not pairs:
                continue
            series = [s for _, s in pairs]
            colour = layout.colours[layout.series(arm)]
            steps = sorted({step for s in series for step in s})
            span = max(1, len(steps) // 60) if row.smooth else 1
            shown = [dict(zip(sorted(s), ema([s[k] for k in sorted(s)], span))) for s in series]
            ax = canvas.ax(i, arm)
            if row.smooth:
                for s in series:
                    ax.plot(sorted(s), [s[k] for k in sorted(s)], color=colour, alpha=0.2, lw=0.5, zorder=1)
            at = [[s[step] for s in shown if step in s] for step in steps]
            mean = [statistics.fmean(v) for v in at]
            canvas.curve(i, arm, steps, mean, n_label(steps, series), lw=1.4, zorder=3,  # above every band
                         marker=None if row.smooth or len(steps) > 40 else ".")
            if len(series) > 1:
                ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=colour, alpha=0.15, lw=0,
                                zorder=2)
            for (run, _), s in zip(pairs, shown):
                if max(s) < steps[-1] or run.stopped_early:  # a run that stopped: its contribution ends here
                    ax.plot([max(s)], [s[max(s)]], "x", color=colour, ms=7, mew=1.8, zorder=4)
            plotted += mean
        log = _use_log(plotted)
        canvas.label_axes(i, row.title, xlabel="step", ylabel=row.ylabel, yscale="log" if log else "linear")
        if row.top is not None and plotted and not log:
            canvas.axes[i][0].set_ylim(min(plotted) - 0.1 * (row.top - min(plotted)), row.top)
    canvas.save(title, path)
    return True


# ---------------------------------------------------------------- the figures


def _max_over_layers(prefix: str) -> Callable[[RunStats], dict[int, float]]:
    return lambda r: {step: max(values) for step, values in r.per_layer(prefix).items()}


def _layer(prefix: str, i: int) -> Callable[[RunStats], dict[int, float]]:
    return lambda r: {step: values[i] for step, values in r.per_layer(prefix).items() if i < len(values)}


def plot_loss_curves(sweep: Sweep, layout: Layout, path: Path) -> bool:
    inits = [r.init_loss for r in sweep.stats if r.init_loss is not None]
    top = max(inits) + 0.5 if inits else None
    span = max(1, max((len(r.curve) for r in sweep.stats), default=1) // 60)
    return plot_over_steps(
        sweep, layout, [StepRow("train loss", "train loss (nats)", lambda r: r.curve, smooth=True, top=top)],
        f"Train loss: seed mean smoothed by an EMA of span {span} steps, over the faint raw seeds; band: min-max "
        f"over seeds; × where a run stopped; axis clipped at the loss at init + 0.5", path)


def plot_attn_logit_max(sweep: Sweep, layout: Layout, path: Path) -> bool:
    return plot_over_steps(sweep, layout, [StepRow("max attention logit", "max q·k/√d_head over layers",
                                                   _max_over_layers("diag/attn_logit_max"))],
                           "Max attention logit over layers, batch, heads and positions, at the sampled steps; "
                           "seed mean, band: min-max over seeds", path)


def plot_attn_entropy(sweep: Sweep, layout: Layout, path: Path) -> bool:
    depth = max(r.record.config["model"]["n_layer"] for r in sweep.stats)
    rows = [StepRow(f"layer {i}", "attention entropy (nats)", _layer("diag/attn_entropy", i)) for i in range(depth)]
    return plot_over_steps(sweep, layout, rows, "Attention entropy per layer, mean over batch, heads and queries, "
                           "at the sampled steps; seed mean, band: min-max over seeds", path)


def plot_logz(sweep: Sweep, layout: Layout, path: Path) -> bool:
    return plot_over_steps(sweep, layout, [StepRow("log Z", "mean log Z = logsumexp(logits)",
                                                   lambda r: r.series("diag/logz_mean"))],
                           "Softmax normalizer log Z, mean over positions, at the sampled steps; seed mean, "
                           "band: min-max over seeds", path)


def plot_fp16_scale(sweep: Sweep, layout: Layout, path: Path) -> bool:
    rows = [StepRow("loss scale", "GradScaler loss scale", lambda r: r.series("amp/scale")),
            StepRow("skipped steps", "cumulative skipped steps", lambda r: r.series("amp/skipped_steps"))]
    return plot_over_steps(sweep, layout, rows, "fp16 dynamic loss scaling: the loss scale and the steps it "
                           "skipped (fp16 arms only); seed mean, band: min-max over seeds", path)


def _reduce_over(prefix: str, reduce: Callable[[list[float]], float]) -> Callable[[RunStats], dict[int, float]]:
    """{step: reduce(values)} over every metric `prefix`/<layer> a run logged at that step."""
    def values(run: RunStats) -> dict[int, float]:
        out = {}
        for row in run.record.rows or ():
            found = [float(v) for k, v in row.items() if k.startswith(prefix + "/") and v is not None]
            found = [v for v in found if math.isfinite(v)]
            if found:
                out[row["step"]] = reduce(found)
        return out
    return values


def plot_numerics(sweep: Sweep, layout: Layout, path: Path) -> bool:
    rows = [StepRow(f"{name}: underflow to zero", "fraction of nonzero values",
                    _reduce_over(f"numerics/{cls}/underflow", max))
            for cls, name in (("act_in", "linear inputs"), ("grad", "output gradients"))]
    rows.append(StepRow("linear inputs: saturated or inf/nan", "fraction of nonzero values",
                        _reduce_over("numerics/act_in/overflow", max)))
    return plot_over_steps(sweep, layout, rows, "What the run's low-precision format loses (numerics/*, measured "
                           "before the cast, fp8 layers after their scale): the worst layer's fraction of nonzero "
                           "values that underflow to zero or saturate, at the sampled steps; seed mean, band: "
                           "min-max over seeds", path)


def plot_lr_sensitivity(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """Final loss vs LR, one line per setting of the other swept keys, with its LR sensitivity."""
    if LR_KEY not in sweep.keys:
        return False
    others = [k for k in sweep.keys if k != LR_KEY]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family, per_lr in lr_curves(sweep.arms, sweep.keys).items():
        lrs = sorted(per_lr)
        losses = [per_lr[lr] for lr in lrs]
        score = statistics.fmean(loss - min(losses) for loss in losses)
        colour = layout.colours.get(family) if layout.panel == LR_KEY else None  # else no series matches
        runs = sweep.runs(dict(zip(others, family)))
        ax.plot(lrs, losses, "o-", color=colour, label=f"{arm_label(family, others)} (LR sensitivity {score:.3f}; "
                f"{len(runs) // len(lrs)} seed(s) per point)")
        failed = sorted({float(r.flat[LR_KEY]) for r in runs if r.final_val is None})
        ax.plot(failed, [per_lr[lr] for lr in failed], "x", color=colour or "k", ms=9, mew=2)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="min(final val loss, loss at init) (nats)")
    ax.set_title(textwrap.fill("Final loss vs peak learning rate: seed mean; × a run without a final loss "
                               "(diverged), counted at its loss at init", 80), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(fig, path)
    return True


def plot_init_grads(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """Gradient RMS per layer at initialization (step 1): rows attention / MLP, one panel per panel value."""
    with_grads = Sweep([s for s in sweep.stats if set(s.init_grads) == set(GRAD_PARTS)], sweep.keys)
    if not with_grads.stats:
        return False
    canvas = Canvas(layout, len(GRAD_PARTS))
    for arm, runs in with_grads.arms.items():
        for row, part in enumerate(GRAD_PARTS):
            layers = list(zip(*(r.init_grads[part] for r in runs)))
            canvas.curve(row, arm, list(range(1, len(layers) + 1)), [statistics.fmean(v) for v in layers],
                         f"n={len(runs)}", marker="o", ms=3)
    for row, part in enumerate(GRAD_PARTS):
        canvas.label_axes(row, f"{part} weights", yscale="log", xlabel="layer", ylabel=f"{part} gradient RMS")
    canvas.save("Gradient RMS per layer at initialization (step 1, before any update), seed mean", path)
    return True


GROUP_ORDER = re.compile(r"L(\d+)\.(\w+)")


def _group_key(group: str) -> tuple:
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


def plot_update_rms(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """Update RMS and gradient RMS per parameter group (mean over sampled steps), with each arm's AdamW eps."""
    parts = (("diag/update_rms/", "update RMS per step"), ("diag/grad_rms/", "gradient RMS"))
    means = {id(r): [mean_by_group(r, prefix) for prefix, _ in parts] for r in sweep.stats}
    groups = sorted({g for m in means.values() for g in m[0]}, key=_group_key)
    if not groups:
        return False
    canvas = Canvas(layout, len(parts), width=max(6.5, 0.4 * len(groups)), height=3.2)
    eps_swept = "optim.eps" in sweep.keys
    for arm, runs in sweep.arms.items():
        for row in range(len(parts)):
            per_run = [means[id(r)][row] for r in runs]
            y = [mean_or_none(m.get(g) for m in per_run) for g in groups]
            ax = canvas.curve(row, arm, list(range(len(groups))), y, f"n={len(runs)}", marker="o", ms=3)
            if row == 1 and eps_swept:
                ax.axhline(runs[0].flat["optim.eps"], color=layout.colours[layout.series(arm)], ls="--", lw=0.9)
    for row, (_, ylabel) in enumerate(parts):
        canvas.label_axes(row, "", yscale="log", ylabel=ylabel)
        for ax in canvas.axes[row]:
            ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    canvas.save("Per parameter group, mean over the sampled steps after step 1: AdamW update RMS (top) and "
                "gradient RMS (bottom)" + ("; dashed: each arm's eps" if eps_swept else ""), path)
    return True


def probe_points(run: RunStats, metric: str, family: str) -> dict[float, float]:
    """{probe std: error} of the norm probe at the first step that logged it."""
    prefix = f"diag/{metric}/{family}/"
    row = next((r for r in run.record.rows or () if any(k.startswith(prefix) for k in r)), {})
    return {float(k[len(prefix):]): float(v) for k, v in row.items() if k.startswith(prefix)}


def plot_norm_error(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """The norm probe: relative error vs the probe rows' std, rows centred / offset, one panel per panel value."""
    from minilm.train.diagnostics import PROBE_MEANS

    if not any(probe_points(r, "norm_error", "centred") for r in sweep.stats):
        return False
    canvas = Canvas(layout, len(PROBE_MEANS), height=3.3)
    floor = 1e-9  # an error of exactly 0 on a log axis
    for arm, runs in sweep.arms.items():
        for row, family in enumerate(PROBE_MEANS):
            for metric, style in (("norm_error", "-"), ("norm_rounding_error", "--")):
                points = [probe_points(r, metric, family) for r in runs]
                stds = sorted(set.intersection(*(set(p) for p in points)))
                if stds:
                    canvas.curve(row, arm, stds, [max(floor, statistics.fmean(p[s] for p in points)) for s in stds],
                                 f"n={len(runs)}", ls=style, marker="o", ms=3)
    for row, mean in enumerate(PROBE_MEANS.values()):
        canvas.label_axes(row, f"rows {mean:g} + std·z" if mean else "rows std·z", xscale="log", yscale="log",
                          xlabel="std of the probe rows", ylabel="relative RMS error of the output")
    canvas.save("Norm output error on rows of small variance against float64, at step 1. Solid: against the "
                "exact normalization (eps = 0, so eps's bias counts as error); dashed: against float64 with the "
                "same eps (the rounding alone)", path)
    return True


FIGURE_TITLES = {
    "loss_curves": "loss curves", "final_loss_vs_lr": "final loss vs learning rate",
    "grad_norm_by_layer": "gradient RMS by layer at init", "attn_logit_max": "max attention logit over steps",
    "attn_entropy": "attention entropy per layer over steps", "logz": "log Z over steps",
    "fp16_scale": "fp16 loss scale and skipped steps", "update_rms": "update and gradient RMS per layer",
    "norm_error": "norm error on small-variance rows", "numerics": "low-precision underflow and overflow",
}
PLOTS: dict[str, Callable[[Sweep, Layout, Path], bool]] = {
    "loss_curves": plot_loss_curves, "final_loss_vs_lr": plot_lr_sensitivity, "grad_norm_by_layer": plot_init_grads,
    "attn_logit_max": plot_attn_logit_max, "attn_entropy": plot_attn_entropy, "logz": plot_logz,
    "fp16_scale": plot_fp16_scale, "update_rms": plot_update_rms, "norm_error": plot_norm_error,
    "numerics": plot_numerics,
}
assert tuple(PLOTS) == FIGURES == tuple(FIGURE_TITLES), "one plot and one title per figure of the schema"


def default_figures(sweep: Sweep) -> list[str]:
    """What a plain sweep (no study node) gets."""
    figures = ["loss_curves"]
    if LR_KEY in sweep.keys:
        figures.append("final_loss_vs_lr")
    if GRAD_KEYS & set(sweep.keys):
        figures.append("grad_norm_by_layer")
    if any(r.flat.get("precision.name") == "fp16" for r in sweep.stats):
        figures.append("fp16_scale")
    return figures


# ---------------------------------------------------------------- the report


def load_records(source: str, group: str | None) -> list[RunRecord]:
    if Path(source).is_dir():
        return [load_run_dir(path) for path in find_run_dirs(Path(source))]
    if is_wandb_path(source, 2):
        return fetch_wandb_runs(source, group)
    raise SourceError(f"{source!r} is neither a directory nor a W&B project path entity/project")


def default_out(source: str, group: str | None) -> Path:
    if Path(source).is_dir():
        return Path(source) / "report"
    return Path("reports") / re.sub(r"[^A-Za-z0-9._=,-]+", "_", "_".join(filter(None, [source, group])))


def study_of(records: list[RunRecord]) -> dict:
    """The study node the runs share ({} when none, or when they come from several studies)."""
    nodes = {repr(r.config.get("study") or {}) for r in records}
    return (records[0].config.get("study") or {}) if len(nodes) == 1 else {}


COMMON_KEYS = ("model.n_layer", "model.d_model", "model.block_size", "model.placement", "norm.kind", "precision.name",
               "optim.lr", "optim.warmup_steps", "train.batch_size", "train.max_steps", "data.vocab_size", "seed")


def settings_line(sweep: Sweep) -> str:
    """The main settings every run shares (seeds listed)."""
    shared = []
    for key in COMMON_KEYS:
        values = sweep.values(key)
        if key == "seed":
            shared.append(f"seeds {', '.join(map(str, values))}")
        elif len(values) == 1 and key not in sweep.keys:
            shared.append(f"{key}={values[0]}")
    return "; ".join(shared)


def divergence_line(sweep: Sweep) -> str:
    lines = {r.record.summary.get("divergence_line") for r in sweep.stats} - {None}
    windows = {r.flat.get("train.divergence_window") for r in sweep.stats} - {None}
    if not lines:
        return ""
    at = f"{min(lines):.3f}" if len(lines) == 1 else f"{min(lines):.3f}–{max(lines):.3f}"
    window = "/".join(map(str, sorted(windows)))
    return (f"Divergence: a non-finite loss, or a loss above the line ln(vocab) + margin = {at} for {window} "
            f"consecutive steps; a crossing that comes back under it sooner is a spike (counted, never a stop).")


def write_report(records: list[RunRecord], source: str, out: Path) -> str:
    """Write report.md, arms.csv and the figures into `out`; return the Markdown."""
    from minilm.analysis.studies import verdicts  # the verdicts build on this module's statistics

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # a figure this report does not draw must not linger from an earlier one
        stale.unlink()
    sweep = Sweep([run_stats(r) for r in records], swept_keys([r.config for r in records]))
    study = study_of(records)
    layout = Layout.of(sweep, study.get("panel"))
    rows = [arm_row(arm_label(arm, sweep.keys), runs) for arm, runs in sweep.arms.items()]
    with open(out / "arms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    md = [f"# Study `{study['name']}`\n" if study.get("name") else f"# Report: {source}\n"]
    if study.get("expected"):
        md.append(f"**Expected.** {study['expected']}\n")
    if study.get("source"):
        md.append(f"**Source.** {study['source']}\n")
    found = verdicts(study.get("name"), sweep)
    if found:
        md.append("## Verdicts, computed from these runs\n")
        md += [f"- {'✔' if v.passed else '✘' if v.passed is False else '–'} {v.claim}: {v.measured}" for v in found]
        md.append("\n✔ agrees with the expectation, ✘ disagrees, – not measurable from these runs.\n")
    md += ["## Runs\n", f"{len(records)} runs from `{source}`, {len(sweep.arms)} arms; swept: "
           f"{', '.join(sweep.keys) or 'nothing'} (seeds pooled). Shared: {settings_line(sweep)}.\n",
           divergence_line(sweep) + "\n"]

    figures = list(study.get("figures") or default_figures(sweep))
    drawn = [name for name in figures if PLOTS[name](sweep, layout, out / f"{name}.png")]
    md.append("## Figures\n")
    md += [f"![{FIGURE_TITLES[name]}]({name}.png)\n" for name in drawn]
    missing = [name for name in figures if name not in drawn]
    if missing:
        md.append(f"Not drawn, no data in these runs: {', '.join(missing)}.\n")

    md += ["## Arms\n", markdown_table(rows)]
    spikes = spike_lines(sweep)
    if spikes:
        md += ["## Spikes\n", *spikes, ""]
    if LR_KEY in sweep.keys:
        md += ["## LR sensitivity (Wortsman et al. 2023)\n", "| setting | LR sensitivity | best loss | at LR |",
               "|---|---|---|---|"]
        for family, (lrs, losses, score) in lr_sensitivity(sweep.arms, sweep.keys).items():
            best = min(losses)
            md.append(f"| {family or 'all runs'} | {score:.4f} | {best:.4f} | {lrs[losses.index(best)]:g} |")
        md.append("")
    if "grad_norm_by_layer" in drawn:
        md += ["## Gradients by layer at initialization (step 1)\n", init_grad_table(sweep)]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


def init_grad_table(sweep: Sweep) -> str:
    lines = ["| arm | layers | mlp grad RMS, first layer | last layer | last / first |", "|---|---|---|---|---|"]
    with_grads = Sweep([s for s in sweep.stats if set(s.init_grads) == set(GRAD_PARTS)], sweep.keys)
    for arm, runs in with_grads.arms.items():
        first = statistics.fmean(r.init_grads["mlp"][0] for r in runs)
        last = statistics.fmean(r.init_grads["mlp"][-1] for r in runs)
        depth = runs[0].record.config["model"]["n_layer"]
        lines.append(f"| {arm_label(arm, sweep.keys)} | {depth} | {first:.3g} | {last:.3g} | {last / first:.2f} |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a dir holding run dirs (e.g. a multirun dir), or a W&B entity/project")
    parser.add_argument("--group", help="W&B: only runs whose group matches this regular expression")
    parser.add_argument("--out", type=Path, help="where to write it (default: SOURCE/report; reports/... for W&B)")
    args = parser.parse_args(argv)
    records = load_records(args.source, args.group)
    if not records:
        raise SourceError(f"no runs found in {args.source}")
    out = args.out or default_out(args.source, args.group)
    print(write_report(records, args.source, out))
    print(f"written to {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`minilm-report` / scripts/report.py."""
    return exit_on_input_error(run, argv)
