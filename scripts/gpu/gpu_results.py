"""Turn the GPU check's results into benchmarks/h200/<date>/: the raw JSON and one Markdown page.

    python3 scripts/gpu/gpu_results.py gpu-results                # RESULTS/part1, part2 and/or part3
    python3 scripts/gpu/gpu_results.py /tmp/dry --out /tmp/page   # a dry run's results (never under benchmarks/)

Copies every part's JSON files and check.log, and writes README.md: date, device, driver and
versions; each section's PASS / FAIL / SKIP line; every goal with its target, the measured figure
and met / missed; then the norm-bandwidth tables, sweep throughput (with the step-level comparison of
bench_ensemble.py), the training figures (CUDA graphs
at model=tiny among them), the correctness sweep and the precision runs. Figures come from the JSON
alone. A dry run's page says so at the top and judges no goal: CPU timings of interpreted kernels are
not GPU figures.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))  # the norm benchmark's goals, figure and tables

from bench_norms import GOALS as NORM_GOALS  # noqa: E402
from bench_norms import figure, markdown  # noqa: E402

PARTS = ("part1", "part2", "part3")
SWEEP_GOALS = {  # part 3: (sweep JSON stem, what, target ratio of runs per hour, batched vs in turn)
    "tiny": ("sweep: lr_qknorm, size=tiny, batched ensembles vs in turn, runs per hour", 10.0),
    "small": ("sweep: 3 runs of lr_qknorm, model=small, batched ensemble vs in turn, runs per hour", 3.0),
}
TRAINING_GOALS = {  # (result key, target, larger is better)
    "mfu": ("MFU, small preset, bf16, torch.compile, torch LayerNorm", 0.45, True),
    "framework_overhead_without_diagnostics": ("framework overhead over a bare loop (same config, diagnostics off)",
                                               0.05, False),
    "diagnostics_overhead": ("diagnostics at their default interval (on vs off)", 0.03, False),
}


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def number(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def header(env: dict, dry_run: bool) -> list[str]:
    title = f"# GPU check: {env.get('device')}, {env.get('date_utc', '')[:10]}"
    lines = [title, ""]
    if dry_run:
        lines += ["**CPU dry run**: toy sizes, Triton kernels through the interpreter. Nothing on this page is a GPU "
                  "figure, and no goal is judged.", ""]
    device = env.get("device")
    if env.get("multiprocessors"):
        device += f" ({env['multiprocessors']} multiprocessors, {env['memory_gib']} GiB, compute capability " \
                  f"{env['capability']})"
    rows = [("date (UTC)", env.get("date_utc")), ("device", device), ("driver", env.get("driver")),
            ("CUDA (torch build)", env.get("cuda")), ("torch", env.get("torch")), ("triton", env.get("triton")),
            ("liger-kernel", env.get("liger-kernel")), ("python", env.get("python")),
            ("commit", env.get("git_commit"))]
    return lines + ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def section_lines(results: Path) -> list[str]:
    lines = ["## Sections", ""]
    for part in PARTS:
        log = results / part / "check.log"
        if not log.exists():
            lines.append(f"- {part}: not run")
            continue
        lines += [f"- {line}" for line in log.read_text().splitlines()
                  if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP", "SUMMARY") or "FAILED" in line]
    return lines + [""]


def headline_training(trainings: dict[str, dict]) -> dict | None:
    """The goals' configuration: compiled, torch LayerNorm (norm kind without the triton_ prefix)."""
    return next((r for r in trainings.values() if r.get("config", {}).get("compile")
                 and not r["config"]["norm"].startswith("triton")), None)


def goal_lines(norms: dict | None, trainings: dict, correctness: dict | None, precision: dict | None,
               dry_run: bool) -> list[str]:
    lines = ["## Goals", "", "| goal | target | measured | status |", "|---|---|---|---|"]

    def status(met: bool | None) -> str:
        return "not judged (CPU dry run)" if dry_run else "not measured" if met is None else "met" if met else "MISSED"

    def performance(measured: str) -> str:
        return "(CPU dry run: no figure)" if dry_run else measured

    targets = {"fwd_85": ">= 85% of copy", "fwdbwd_70": ">= 70% of copy", "small_2x_eager": ">= 2x",
               "not_slower": ">= 1x (never slower)"}
    for name, text in NORM_GOALS.items():
        g = (norms or {}).get("goals", {}).get(name)
        measured = "" if not g or g["worst"] is None else \
            f"worst {figure(g['worst'], g['unit'])} ({len(g['misses'])} of {g['cases']} cases miss)"
        met = None if not g or g["status"] == "not measured" else g["status"] == "met"
        lines.append(f"| norms: {text} | {targets[name]} | {performance(measured)} | {status(met)} |")
    headline = headline_training(trainings)
    for key, (text, target, larger) in TRAINING_GOALS.items():
        value = None if headline is None else headline.get(key)
        met = None if value is None else value >= target if larger else value <= target
        lines.append(f"| training: {text} | {'>=' if larger else '<='} {percent(target)} | "
                     f"{performance(percent(value))} | {status(met)} |")
    if correctness:
        failed = sum(not c["ok"] for c in correctness["cases"])
        measured = f"{len(correctness['cases'])} cases, {failed} failed" + ("" if correctness.get("complete")
                                                                            else " (sweep incomplete)")
        met = failed == 0 and correctness.get("complete", False)
    else:
        measured, met = "", None
    lines.append(f"| kernels against float64, bitwise deterministic | every case | {measured} | {status(met)} |")
    runs = (precision or {}).get("results", {})
    measured = ", ".join(f"{p} {'ok' if r['ok'] else 'FAILED'}" for p, r in runs.items())
    lines.append(f"| precision paths: fp16 + GradScaler and bf16 train finite | both | {measured} | "
                 f"{status(all(r['ok'] for r in runs.values()) if runs else None)} |")
    return lines + [""]


def training_lines(trainings: dict[str, dict], title: str = "Training throughput") -> list[str]:
    if not trainings:
        return [f"## {title}", "", "Not measured.", ""]
    lines = [f"## {title}", "",
             "| config | tokens/s | step ms | bare loop step ms | overhead | MFU | bf16 matmul TFLOP/s | peak MiB | "
             "first step s | graph breaks | recompiles | diagnostics |",
             "|---" * 12 + "|"]
    for name, r in trainings.items():
        compiled = r.get("compile") or {}
        lines.append(" | ".join([
            f"| {name}", number(r.get("tokens_per_s")), number(r.get("step_time_ms")),
            number(r.get("bare_step_time_ms")), percent(r.get("framework_overhead")), percent(r.get("mfu")),
            number(r.get("bf16_matmul_tflops_measured")), number(r.get("peak_memory_mb")),
            number(r.get("first_step_s"), 3), str(compiled.get("graph_breaks", "")),
            str(compiled.get("recompiles", "")), percent(r.get("diagnostics_overhead"))]) + " |")
    sample = next(iter(trainings.values()))
    lines += ["", f"Device: {sample.get('device')}; {sample.get('steps')} timed steps, best of "
                  f"{sample.get('repeats')}; overhead = Trainer step time over a bare loop's (diagnostics as "
                  "configured); MFU against the bf16 matmul rate measured in the same run.", ""]
    return lines


def correctness_lines(correctness: dict | None) -> list[str]:
    lines = ["## Correctness sweep", ""]
    if not correctness:
        return lines + ["Not run.", ""]
    lines += [f"Sizes {correctness['sizes']}, {correctness['rows']} random rows, paths {correctness['paths']}; "
              "error = max |error| / the size of the terms, judged against the tests' tolerance.", "",
              "| norm | dtype | cases | failed | worst error / tolerance |", "|---|---|---|---|---|"]
    groups = {}
    for case in correctness["cases"]:
        groups.setdefault((case["norm"], case["dtype"]), []).append(case)
    for (norm, dtype), cases in sorted(groups.items()):
        ratios = [max(c["errors"].values()) / c["tol"] for c in cases if c.get("errors")]
        lines.append(f"| {norm} | {dtype} | {len(cases)} | {sum(not c['ok'] for c in cases)} | "
                     f"{max(ratios):.2f} |" if ratios else f"| {norm} | {dtype} | {len(cases)} | {len(cases)} | |")
    failures = [c for c in correctness["cases"] if not c["ok"]]
    lines += [f"- FAILED {c['norm']} {c['dtype']} N={c['n']} {c['path']} {c['case']}: "
              f"{c.get('error') or c.get('errors')}" for c in failures]
    return lines + [""]


def precision_lines(precision: dict | None) -> list[str]:
    lines = ["## Precision paths", ""]
    if not precision:
        return lines + ["Not run.", ""]
    lines += ["| precision | outcome | steps | loss first -> last | skipped steps | loss scale | failed checks |",
              "|---|---|---|---|---|---|---|"]
    for name, r in precision["results"].items():
        failed = ", ".join(k for k, ok in r.get("checks", {}).items() if not ok) or r.get("error", "")
        lines.append(f"| {name} | {r.get('outcome')} | {r.get('steps')} | {number(r.get('first_loss'))} -> "
                     f"{number(r.get('last_loss'))} | {r.get('skipped_steps')} | {r.get('loss_scale')} | {failed} |")
    return lines + ["", f"Overrides: `{' '.join(precision['overrides'])}`", ""]


def sweep_goal_lines(sweeps: dict[str, dict], graphs: dict[str, dict], dry_run: bool) -> list[str]:
    """Part 3's goals: sweep throughput ratios, and CUDA graphs against inductor's default mode."""
    lines = []
    for stem, (text, target) in SWEEP_GOALS.items():
        ratio = (sweeps.get(stem) or {}).get("ratio")
        measured = "(CPU dry run: no figure)" if dry_run else "" if ratio is None else f"{ratio:.1f}x"
        met = "not judged (CPU dry run)" if dry_run else "not measured" if ratio is None else \
            "met" if ratio >= target else "MISSED"
        lines.append(f"| {text} | >= {target:g}x | {measured} | {met} |")
    default, cuda_graphs = (graphs.get(k, {}).get("tokens_per_s") for k in ("tiny_compiled", "tiny_cuda_graphs"))
    ratio = cuda_graphs / default if default and cuda_graphs else None
    measured = "(CPU dry run: no figure)" if dry_run else "" if ratio is None else f"{ratio:.2f}x"
    met = "not judged (CPU dry run)" if dry_run else "not measured" if ratio is None else \
        "pays" if ratio > 1 else "does not pay"
    lines.append(f"| training: model=tiny compiled, CUDA graphs (reduce-overhead) vs inductor's default mode, "
                 f"tokens/s | > 1x where it pays | {measured} | {met} |")
    return lines + [""]


def sweep_lines(sweeps: dict[str, dict]) -> list[str]:
    lines = ["## Sweep throughput", ""]
    if not sweeps:
        return lines + ["Not measured.", ""]
    lines += ["| sweep | runs x steps | launcher | in turn s | batched s | runs per hour in turn | batched | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in sweeps.items():
        way = r["launcher"]
        seconds, per_hour = r["median_seconds"], r["runs_per_hour"]
        lines.append(f"| {name}: `{' '.join(r['overrides'])}` | {r['runs']} x {r['steps']} | {way} | "
                     f"{number(seconds['sequential'])} | {number(seconds[way])} | {number(per_hour['sequential'])} | "
                     f"{number(per_hour[way])} | {r['ratio']:.2f}x |")
    return lines + [""]


def step_lines(steps: dict[str, dict]) -> list[str]:
    """bench_ensemble.py: a run's step alone, as an ensemble member, and folded into one larger batch."""
    if not steps:
        return []
    lines = ["Step level (`scripts/bench/bench_ensemble.py`): ms per run-step, medians; the ratios are paired medians.",
             "",
             "| overrides | members | alone ms | ensemble ms | folded ms | alone / ensemble | alone / folded |",
             "|---|---|---|---|---|---|---|"]
    for r in steps.values():
        ms, ratios = r["median_ms_per_run_step"], r["ratios"]
        lines.append(f"| `{' '.join(r['overrides'])}` | {r['members']} | {number(ms['alone'])} | "
                     f"{number(ms['ensemble'])} | {number(ms['folded'])} | {ratios['ensemble']:.2f}x | "
                     f"{ratios['folded']:.2f}x |")
    return lines + [""]


def page(results: Path) -> tuple[str, dict]:
    env = next((e for e in (load(results / part / "environment.json") for part in PARTS) if e), {})
    dry_run = env.get("dry_run", True)
    norms = load(results / "part1" / "bench_norms.json")
    correctness = load(results / "part1" / "correctness.json")
    precision = load(results / "part1" / "precision.json")
    trainings = {p.stem.removeprefix("train_"): load(p) for p in sorted((results / "part2").glob("train_*.json"))}
    trainings = {k: v for k, v in trainings.items() if v}
    lines = header(env, dry_run) + section_lines(results)
    lines += goal_lines(norms, trainings, correctness, precision, dry_run)[:-1]
    sweeps = {p.stem.removeprefix("sweep_"): load(p) for p in sorted((results / "part3").glob("sweep_*.json"))}
    sweeps = {k: v for k, v in sweeps.items() if v}
    graphs = {p.stem.removeprefix("train_"): load(p) for p in sorted((results / "part3").glob("train_*.json"))}
    graphs = {k: v for k, v in graphs.items() if v}
    steps = {p.stem: load(p) for p in sorted((results / "part3").glob("step_*.json"))}
    lines += sweep_goal_lines(sweeps, graphs, dry_run) + sweep_lines(sweeps) + step_lines(
        {k: v for k, v in steps.items() if v})
    lines += ["## Norm bandwidth", "", markdown(norms) if norms else "Not measured.", ""]
    lines += training_lines(trainings) + training_lines(graphs, "CUDA graphs, model=tiny (part 3)")
    lines += correctness_lines(correctness)
    lines += precision_lines(precision)
    return "\n".join(lines), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the folder holding part1/, part2/ and/or part3/")
    parser.add_argument("--out", type=Path, help="default: benchmarks/h200/<date of the run>")
    args = parser.parse_args()
    if not any((args.results / part / "check.log").exists() for part in PARTS):
        sys.exit(f"{args.results} holds no part1/, part2/ or part3/check.log: pass the folder the GPU check "
                 f"wrote (OUT of scripts/gpu/gpu_check.sh)")
    text, env = page(args.results)
    if env.get("dry_run", True) and args.out is None:
        sys.exit("these are dry-run (CPU) results, not GPU figures: pass --out to render them outside benchmarks/")
    out = args.out or ROOT / "benchmarks" / "h200" / env["date_utc"][:10]
    for part in PARTS:
        for source in sorted((args.results / part).glob("*.json")) + sorted((args.results / part).glob("check.log")):
            (out / part).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / part / source.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    print(f"wrote {out / 'README.md'} and the raw JSON under {out}")


if __name__ == "__main__":
    main()
