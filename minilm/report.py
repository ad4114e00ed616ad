"""Compare the arms of a sweep: a table, plots and a Markdown summary, offline from local run dirs.

    minilm-report multirun/<date>/<time>             # any dir holding run dirs
    minilm-report ENTITY/minilm --group 'experiment=lr_qknorm'   # W&B runs whose group matches
    minilm-report SOURCE --out DIR                     # default: SOURCE/report

Arms are the values of the swept keys: the config keys whose values differ between runs,
except `seed`, so seeds pool. A key whose value follows from another swept key's (e.g.
precision.init_scale from precision.name) is left out of the label.

Per arm (written to arms.csv and report.md, and printed):
  final val loss   mean ± 95% CI over the seeds with a final loss (Student t, n-1 dof); a run
                   stopped by divergence, or ending non-finite, has none
  best val loss    the lowest val/loss any seed of the arm reached
  diverged         seeds that diverged / seeds; median step of divergence
  fp16 skipped     steps skipped by the fp16 loss scaler, mean over seeds
  spike score      diag/loss_spike_score (fraction of steps that spiked), mean over seeds
  tokens/s         median over each run's logged windows, mean over seeds
When optim.lr is swept: LR sensitivity (Wortsman et al. 2023) per setting of the other swept
keys = mean over the LR grid of [min(final val loss, loss at init) - best of those over the
grid], where a seed without a final loss counts its loss at init (its step-1 train loss),
and each grid point is the mean over its seeds.

Plots: loss_curves.png (train loss per arm, mean over seeds with a min-max band),
final_loss_vs_lr.png (LR sweeps), grad_norm_by_layer.png (whenever the runs logged the
per-layer gradients of step 1, i.e. at initialization: diag/grad_rms/L{i}.attn and .mlp, and
model.placement or model.n_layer is swept).
"""

import argparse
import csv
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

from minilm.errors import SourceError, exit_on_input_error  # noqa: E402
from minilm.runs import (  # noqa: E402
    RunRecord,
    fetch_wandb_runs,
    find_run_dirs,
    flatten,
    is_wandb_path,
    load_run_dir,
)

LR_KEY = "optim.lr"
# Student t 97.5% quantiles for 1..30 degrees of freedom (two-sided 95% interval)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
GRAD_PARTS = ("attn", "mlp")
GRAD_KEYS = {"model.placement", "model.n_layer"}  # sweeps whose gradients at init the report plots by layer


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


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# ---------------------------------------------------------------- one run


@dataclass
class RunStats:
    record: RunRecord
    final_val: float | None      # the last val/loss; None if the run was stopped by divergence or ended non-finite
    best_val: float | None
    init_loss: float | None      # train/loss at step 1: the loss before any update
    diverged: bool
    diverged_at: int | None
    skipped: float
    spike_score: float | None
    tokens_per_s: float | None
    curve: dict[int, float]
    init_grads: dict[str, list[float]]  # "attn"/"mlp" -> gradient RMS per layer at step 1


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
        skipped=float(_last(record, "amp/skipped_steps") or 0),
        spike_score=_last(record, "diag/loss_spike_score"),
        tokens_per_s=statistics.median(tokens) if tokens else None,
        curve={step: loss for step, loss in train.items() if math.isfinite(loss)},
        init_grads={part: values for part, values in grads.items() if None not in values},
    )


# ---------------------------------------------------------------- arms


def swept_keys(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between runs (seed aside), minus those another swept key determines."""
    flat = [flatten(c) for c in configs]
    keys = [k for k in dict.fromkeys(k for f in flat for k in f)
            if k != "seed" and len({repr(f.get(k)) for f in flat}) > 1]

    def determines(a: str, b: str) -> bool:
        mapping = {}
        return all(mapping.setdefault(repr(f.get(a)), repr(f.get(b))) == repr(f.get(b)) for f in flat)

    kept: list[str] = []
    for key in sorted(keys, key=lambda k: -len({repr(f.get(k)) for f in flat})):  # most values first
        if not any(determines(other, key) for other in kept):
            kept.append(key)
    return [k for k in keys if k in kept]  # in config order


def arm_label(arm: tuple, keys: list[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, arm)) or "all runs"


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def group_arms(stats: list[RunStats], keys: list[str]) -> dict[tuple, list[RunStats]]:
    arms: dict[tuple, list[RunStats]] = {}
    for s in stats:
        flat = flatten(s.record.config)
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
        "fp16_skipped_steps": statistics.fmean(r.skipped for r in runs),
        "spike_score": mean_or_none(r.spike_score for r in runs),
        "tokens_per_s": mean_or_none(r.tokens_per_s for r in runs),
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    header = ("| arm | seeds | final val loss (mean ± 95% CI) | best val loss | diverged | median divergence step "
              "| fp16 skipped steps | spike score | tokens/s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        final = _fmt(r["final_val_mean"])
        if r["final_val_ci95"] is not None:
            final += f" ± {r['final_val_ci95']:.4f}"
        if r["final_val_n"] != r["seeds"]:
            final += f" (n={r['final_val_n']})"
        lines.append(f"| {r['arm']} | {r['seeds']} | {final} | {_fmt(r['best_val'])} | {r['diverged']}/{r['seeds']} "
                     f"| {_fmt(r['median_divergence_step'])} | {_fmt(r['fp16_skipped_steps'], 1)} "
                     f"| {_fmt(r['spike_score'])} | {_fmt(r['tokens_per_s'], 0)} |")
    return header + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- learning-rate sensitivity


def lr_sensitivity(arms: dict[tuple, list[RunStats]], keys: list[str]) -> dict[str, tuple[list, list, float]]:
    """{setting of the other swept keys: (LRs, per-LR loss, LR sensitivity)} (Wortsman et al. 2023)."""
    lr_index = keys.index(LR_KEY)
    others = [k for k in keys if k != LR_KEY]
    families: dict[str, dict[float, list[float]]] = {}
    for arm, runs in arms.items():
        family = arm_label(arm[:lr_index] + arm[lr_index + 1:], others)
        losses = [min(r.final_val if r.final_val is not None else math.inf, r.init_loss)
                  for r in runs if r.init_loss is not None]
        if losses:
            families.setdefault(family, {})[float(arm[lr_index])] = statistics.fmean(losses)
    result = {}
    for family, per_lr in families.items():
        lrs = sorted(per_lr)
        losses = [per_lr[lr] for lr in lrs]
        best = min(losses)
        result[family] = (lrs, losses, statistics.fmean(loss - best for loss in losses))
    return result


# ---------------------------------------------------------------- plots


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_loss_curves(arms: dict[tuple, list[RunStats]], keys: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    inits = [r.init_loss for runs in arms.values() for r in runs if r.init_loss is not None]
    for color, (arm, runs) in zip(_colors(len(arms)), arms.items()):
        steps = sorted({s for r in runs for s in r.curve})
        per_step = [[r.curve[s] for r in runs if s in r.curve] for s in steps]
        ax.plot(steps, [statistics.fmean(v) for v in per_step], color=color,
                label=f"{arm_label(arm, keys)} (n={len(runs)})")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.2)
    if inits:  # spikes above the loss at init would flatten every curve
        ax.set_ylim(top=max(inits) + 0.5)
    ax.set(xlabel="step", ylabel="train loss", title="Train loss per arm (mean over seeds, band: min-max)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lr_sensitivity(sensitivity: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    for color, (family, (lrs, losses, score)) in zip(_colors(len(sensitivity)), sensitivity.items()):
        ax.plot(lrs, losses, "o-", color=color, label=f"{family} (LR sensitivity {score:.3f})")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="min(final val loss, loss at init)",
           title="Final loss vs learning rate (mean over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_init_grads(stats: list[RunStats], keys: list[str], path: Path) -> None:
    """Gradient RMS per layer at initialization: one column per depth, one line per arm (depth aside)."""
    depths = sorted({s.record.config["model"]["n_layer"] for s in stats})
    line_keys = [k for k in keys if k != "model.n_layer"]
    fig, axes = plt.subplots(len(GRAD_PARTS), len(depths), figsize=(4 * len(depths), 6.5), squeeze=False)
    for col, depth in enumerate(depths):
        arms = group_arms([s for s in stats if s.record.config["model"]["n_layer"] == depth], line_keys)
        for color, (arm, runs) in zip(_colors(len(arms)), arms.items()):
            for row, part in enumerate(GRAD_PARTS):
                layers = list(zip(*(r.init_grads[part] for r in runs)))
                axes[row][col].plot(range(1, depth + 1), [statistics.fmean(v) for v in layers], "o-", ms=3,
                                    color=color, label=arm_label(arm, line_keys))
        for row, part in enumerate(GRAD_PARTS):
            axes[row][col].set(yscale="log", title=f"{depth} layers: {part}", xlabel="layer",
                               ylabel="gradient RMS at init" if col == 0 else None)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def init_grad_table(stats: list[RunStats], keys: list[str]) -> str:
    lines = ["| arm | layers | mlp grad RMS, first layer | last layer | last / first |", "|---|---|---|---|---|"]
    for arm, runs in group_arms(stats, keys).items():
        first = statistics.fmean(r.init_grads["mlp"][0] for r in runs)
        last = statistics.fmean(r.init_grads["mlp"][-1] for r in runs)
        depth = runs[0].record.config["model"]["n_layer"]
        lines.append(f"| {arm_label(arm, keys)} | {depth} | {first:.3g} | {last:.3g} | {last / first:.2f} |")
    return "\n".join(lines) + "\n"


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


def write_report(records: list[RunRecord], source: str, out: Path) -> str:
    """Write arms.csv, report.md and the plots into `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    stats = [run_stats(r) for r in records]
    keys = swept_keys([r.config for r in records])
    arms = group_arms(stats, keys)
    rows = [arm_row(arm_label(arm, keys), runs) for arm, runs in arms.items()]
    with open(out / "arms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_curves(arms, keys, out / "loss_curves.png")
    md = [f"# Report: {source}\n", f"{len(records)} runs, {len(arms)} arms; swept keys: "
          f"{', '.join(keys) or 'none'} (seeds pooled).\n", markdown_table(rows), "![loss curves](loss_curves.png)\n"]
    if LR_KEY in keys:
        sensitivity = lr_sensitivity(arms, keys)
        plot_lr_sensitivity(sensitivity, out / "final_loss_vs_lr.png")
        md += ["## LR sensitivity (Wortsman et al. 2023)\n", "| setting | LR sensitivity | best loss | at LR |",
               "|---|---|---|---|"]
        for family, (lrs, losses, score) in sensitivity.items():
            best_lr = lrs[losses.index(min(losses))]
            md.append(f"| {family or 'all runs'} | {score:.4f} | {min(losses):.4f} | {best_lr:g} |")
        md.append("\n![final loss vs LR](final_loss_vs_lr.png)\n")
    with_grads = [s for s in stats if set(s.init_grads) == set(GRAD_PARTS)]
    if with_grads and GRAD_KEYS & set(keys):
        plot_init_grads(with_grads, keys, out / "grad_norm_by_layer.png")
        md += ["## Gradients by layer at initialization (step 1)\n", init_grad_table(with_grads, keys),
               "\n![gradient RMS by layer](grad_norm_by_layer.png)\n"]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


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
