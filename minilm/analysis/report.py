"""Compare the arms of a sweep: a Markdown summary, a table and figures, offline from local run dirs.

    minilm-report multirun/<date>/<time>             # any dir holding run dirs
    minilm-report ENTITY/minilm --group 'experiment=lr_qknorm'   # W&B runs whose group matches
    minilm-report SOURCE --out DIR                     # default: SOURCE/report

The arms and their statistics are minilm/analysis/sweep.py's, the figures minilm/analysis/figures.py's.
A canned study's runs carry its `study` node (minilm/config.py StudyConfig): the expected
outcome and its source open report.md, followed by one verdict per expectation computed from
the runs (minilm/analysis/studies/), each naming the seeds it rests on. A figure without data is not
drawn, and report.md says so. A coordinate check that `minilm-coordcheck --out SOURCE/<name>` kept in the
sweep dir joins the page, with its slopes.
"""

import argparse
import csv
import json
import re
import shutil
import statistics
from pathlib import Path

from minilm.analysis.figures import (
    FIGURE_TITLES,
    PLOTS,
    Layout,
    default_figures,
)
from minilm.analysis.runs import (
    RunRecord,
    fetch_wandb_runs,
    find_run_dirs,
    is_wandb_path,
    load_run_dir,
)
from minilm.analysis.studies import verdicts
from minilm.analysis.sweep import (
    GRAD_PARTS,
    LR_KEY,
    Sweep,
    arm_label,
    arm_row,
    lr_sensitivity,
    run_stats,
    swept_keys,
)
from minilm.errors import SourceError, exit_on_input_error


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
        md.append("\n✔ agrees with the expectation, ✘ disagrees, – not measurable from these runs. A verdict that "
                  "compares arms names the seeds per arm it rests on: under 3 it is an observation; from 3 on, "
                  "its intervals are 95% Student-t intervals over the seeds.\n")
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

    md += coord_check_section(source, out)
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


def coord_check_section(source: str, out: Path) -> list[str]:
    """The coordinate checks kept in the sweep dir (SOURCE/<name>/coordcheck.json and .png): each figure, copied
    as <name>.png, and its log-log slopes of activation RMS against width at the last step."""
    found = sorted(Path(source).glob("*/coordcheck.json")) if Path(source).is_dir() else []
    md = ["## Coordinate check (minilm-coordcheck)\n"] if found else []
    for path in found:
        record = json.loads(path.read_text())
        shutil.copyfile(path.with_suffix(".png"), out / f"{path.parent.name}.png")
        slopes = {name: values[-1] for name, values in record["slope"].items()}
        blocks = [v for name, v in slopes.items() if name.startswith("L")]
        md += [f"![coordinate check, {record['parametrization']}]({path.parent.name}.png)\n",
               f"`{' '.join(record['overrides'])}`: {record['parametrization']}, optim={record['optimizer']}, "
               f"constant lr {record['lr']:g}, widths {', '.join(map(str, record['widths']))}, {record['steps']} "
               f"steps. Log-log slope of activation RMS against width at step {record['steps'] - 1}: embedding "
               f"{slopes['embedding']:+.2f}, block outputs {min(blocks):+.2f} to {max(blocks):+.2f}, logits "
               f"{slopes['logits']:+.2f} (0: the width does not change the activations' size).\n"]
    return md


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

