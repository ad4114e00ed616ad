"""The report's figures, drawn from a sweep's statistics (minilm/analysis/sweep.py).

A plain sweep gets the loss curves, plus the LR figure when optim.lr is swept, the gradients at
init when model.placement or model.n_layer is, and the fp16 scaler when an fp16 run is present;
a study names its own `figures`, with one panel per value of its `panel` key. A figure without
data is not drawn.

Every curve is the mean over an arm's seeds with a min-max band; `n=` counts the seeds that
contribute, and a run that stopped early ends with a cross. Train loss is smoothed by an
exponential moving average drawn over the faint raw curves of the seeds.
"""

import io
import math
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402  (after choosing the non-interactive backend)
import matplotlib.pyplot as plt  # noqa: E402

from minilm.analysis.sweep import (  # noqa: E402
    GRAD_PARTS,
    LR_KEY,
    RunStats,
    Sweep,
    arm_label,
    ema,
    group_key,
    lr_curves,
    mean_by_group,
    mean_or_none,
    probe_points,
    sort_key,
)
from minilm.config import FIGURES  # noqa: E402
from minilm.rundir import PROBE_MEANS  # noqa: E402

GRAD_KEYS = {"model.placement", "model.n_layer"}  # sweeps whose gradients at init the report plots by layer
DPI = 90
LEGEND_CHAR_IN = 0.065  # inches per character of a legend label at its font size (7.5 pt)
LOG_SPAN = 100  # a quantity whose max / min exceeds this gets a log axis


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
        series = sorted({layout.series(arm) for arm in sweep.arms}, key=lambda s: [sort_key(v) for v in s])
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
        shown = sorted({layout.series(arm) for _, arm, *_ in self.curves}, key=lambda s: [sort_key(v) for v in s])
        counts = {n for *_, n in self.curves}
        notes = [f"panels: {layout.panel}"] if layout.panel else []
        if len(counts) == 1:
            notes.append(f"{counts.pop()} per curve")
        else:  # curves differ in n: each says its own
            for ax, arm, x, y, n in self.curves:
                ax.annotate(n, (x, y), fontsize=6, color=layout.colours[layout.series(arm)],
                            xytext=(2, 2), textcoords="offset points")
        handles = [matplotlib.lines.Line2D([], [], color=layout.colours[s], lw=2) for s in shown]
        labels = [arm_label(s, series_keys) for s in shown]
        fits = int(self.fig.get_figwidth() / (LEGEND_CHAR_IN * (max(map(len, labels), default=0) + 5)))
        ncol = max(1, min(3, len(handles), fits))  # long labels take fewer columns, so none runs off the figure
        legend_rows = math.ceil(len(handles) / ncol)
        self.fig.legend(handles, labels, loc="lower center", ncol=ncol,
                        fontsize=7.5, title="; ".join(notes) or None, title_fontsize=7.5, frameon=False)
        height = self.fig.get_figheight() + 0.2 * max(0, legend_rows - 2)  # a taller legend gets its own room
        self.fig.set_figheight(height)
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


def _per_layer_over_steps(prefix: str, ylabel: str, title: str) -> Callable[[Sweep, Layout, Path], bool]:
    """A figure of a per-layer metric over the sampled steps: one row per layer."""
    def plot(sweep: Sweep, layout: Layout, path: Path) -> bool:
        depth = max(r.record.config["model"]["n_layer"] for r in sweep.stats)
        rows = [StepRow(f"layer {i}", ylabel, _layer(prefix, i)) for i in range(depth)]
        return plot_over_steps(sweep, layout, rows, title, path)
    return plot


plot_attn_entropy = _per_layer_over_steps(
    "diag/attn_entropy", "attention entropy (nats)", "Attention entropy per layer, mean over batch, heads and queries, "
    "at the sampled steps; seed mean, band: min-max over seeds")
plot_attn_sink = _per_layer_over_steps(
    "diag/attn_sink", "attention on position 0", "Attention sink per layer: the mean softmax probability on the "
    "first token, over batch, heads and queries 1 … T−1, at the sampled steps; seed mean, band: min-max over seeds")


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


DEPTH_ROWS = (("diag/resid_var", "residual variance", "log"), ("diag/block_skip_dloss", "val loss rise when skipped",
                                                                   "linear"))


def plot_depth_profile(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """Per block, at the last step that logged it: the residual stream's variance and the val loss rise when the
    block is skipped, seed means, one panel per panel value."""
    canvas, drawn = Canvas(layout, len(DEPTH_ROWS)), False
    for arm, runs in sweep.arms.items():
        for row, (prefix, _, _) in enumerate(DEPTH_ROWS):
            profiles = [values[max(values)] for values in (r.per_layer(prefix) for r in runs) if values]
            if profiles:
                layers = list(zip(*profiles))
                canvas.curve(row, arm, list(range(1, len(layers) + 1)), [statistics.fmean(v) for v in layers],
                             f"n={len(profiles)}", marker="o", ms=3)
                drawn = True
    if not drawn:
        plt.close(canvas.fig)
        return False
    for row, (_, label, scale) in enumerate(DEPTH_ROWS):
        canvas.label_axes(row, label, yscale=scale, xlabel="block", ylabel=label)
    canvas.save("Per block at the end of the run: the residual stream's variance (diag/resid_var) and the val loss "
                "rise when the block is skipped (diag/block_skip_dloss), seed mean", path)
    return True


def plot_update_rms(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """Update RMS and gradient RMS per parameter group (mean over sampled steps), with each arm's AdamW eps."""
    parts = (("diag/update_rms/", "update RMS per step"), ("diag/grad_rms/", "gradient RMS"))
    means = {id(r): [mean_by_group(r, prefix) for prefix, _ in parts] for r in sweep.stats}
    groups = sorted({g for m in means.values() for g in m[0]}, key=group_key)
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


def plot_norm_error(sweep: Sweep, layout: Layout, path: Path) -> bool:
    """The norm probe: relative error vs the probe rows' std, rows centred / offset, one panel per panel value."""
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
    "attn_entropy": "attention entropy per layer over steps", "attn_sink": "attention on the first token per layer "
    "over steps", "logz": "log Z over steps",
    "fp16_scale": "fp16 loss scale and skipped steps", "update_rms": "update and gradient RMS per layer",
    "norm_error": "norm error on small-variance rows", "numerics": "low-precision underflow and overflow",
    "depth_profile": "residual variance and skip-one-block loss rise per block",
}


PLOTS: dict[str, Callable[[Sweep, Layout, Path], bool]] = {
    "loss_curves": plot_loss_curves, "final_loss_vs_lr": plot_lr_sensitivity, "grad_norm_by_layer": plot_init_grads,
    "attn_logit_max": plot_attn_logit_max, "attn_entropy": plot_attn_entropy, "attn_sink": plot_attn_sink,
    "logz": plot_logz,
    "fp16_scale": plot_fp16_scale, "update_rms": plot_update_rms, "norm_error": plot_norm_error,
    "numerics": plot_numerics, "depth_profile": plot_depth_profile,
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

