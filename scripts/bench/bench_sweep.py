"""Sweep throughput: a multirun run one job after another vs as batched ensembles (or jobs side by side).

    python scripts/bench/bench_sweep.py                                  # the CPU figure: a seed x LR grid at size=tiny
    python scripts/bench/bench_sweep.py experiment=lr_qknorm size=tiny --steps 100
    python scripts/bench/bench_sweep.py --steps 300 --jobs 2                 # two ensembles at once, a thread each
    python scripts/bench/bench_sweep.py experiment=precision_matrix size=tiny --launcher parallel
    python scripts/bench/bench_sweep.py experiment=lr_qknorm model=small --steps 30 --json out.json   # a GPU

Runs `train.py -m <overrides>` the way a user types it, at the same steps (train.max_steps=--steps, with
logger=none), once with Hydra's basic launcher (every job after the previous one) and once with
`hydra/launcher=<--launcher>` (ensemble: batched ensembles; parallel: hydra-joblib-launcher), alternately
`--repeats` times, and keeps each way's median wall time. Prints both wall times, runs per hour and their
ratio, then each job's final train and val loss both ways side by side (a member of an ensemble trains as
its run alone, to the tolerance tests/test_ensemble.py states; jobs side by side compute exactly what they
compute in turn). The last line is the ratio, `N.Nx`. Wall times include each command's start (Python,
imports, data preparation) and everything a run does (evaluation, the sample, checkpoints).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the CPU figure: seed x learning-rate runs of one architecture, at size=tiny
DEFAULT = ["size=tiny", "optim.lr=1e-3,3e-3,1e-2", "seed=0,1"]
DEFAULT_STEPS = 40


def run_sweep(overrides: list[str], launcher: str | None, sweep_dir: Path, log: Path, jobs: int | None = None) -> float:
    """Wall seconds of one multirun; raises when it fails."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    if launcher:
        command.append(f"hydra/launcher={launcher}")
        if jobs:
            command.append(f"hydra.launcher.n_jobs={jobs}")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):  # 3: some job diverged, which a study may well show
        sys.exit(f"{' '.join(command[2:])} failed with exit code {proc.returncode}; its output is in {log}")
    return seconds


def final_losses(sweep_dir: Path) -> dict[str, tuple]:
    """{job dir name: (final train loss, final val loss, outcome)}."""
    out = {}
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
        train = [row["train/loss"] for row in rows if "train/loss" in row]
        out[summary_path.parent.name] = (train[-1] if train else None, summary.get("val/loss"), summary["outcome"])
    return out


def show(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help=f"the multirun's overrides (default: {' '.join(DEFAULT)})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="train.max_steps of every run")
    parser.add_argument("--launcher", default="ensemble", choices=["ensemble", "parallel", "parallel_gpu"])
    parser.add_argument("--jobs", type=int, help="the launcher's hydra.launcher.n_jobs (default: its own)")
    parser.add_argument("--repeats", type=int, default=1, help="sequential / batched pairs; medians are kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep the multirun dirs here (default: a temporary dir)")
    args = parser.parse_intermixed_args()  # overrides may come before and after the options

    overrides = [*(args.overrides or DEFAULT), f"train.max_steps={args.steps}", "logger=none"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    earlier = sorted(path.name for path in work.iterdir() if path.name.startswith(("sequential", args.launcher)))
    if earlier:  # a multirun skips the jobs its dir already finished: the times would mean nothing
        sys.exit(f"--keep {work} already holds {earlier[0]}; pass a new or empty dir")
    load = os.getloadavg()[0]
    print(f"overrides: {' '.join(overrides)}; {os.cpu_count()} CPUs, load average {load:.2f} at the start")
    times: dict[str, list[float]] = {"sequential": [], args.launcher: []}
    for repeat in range(args.repeats):  # alternate, so that load from elsewhere falls on both ways alike
        for way, launcher in (("sequential", None), (args.launcher, args.launcher)):
            sweep_dir = work / f"{way}{repeat}"
            seconds = run_sweep(overrides, launcher, sweep_dir, work / f"{way}{repeat}.log", args.jobs)
            times[way].append(seconds)
            print(f"repeat {repeat + 1}: {way} {seconds:.1f} s", flush=True)

    sequential, batched = (final_losses(work / f"{way}0") for way in times)
    if sequential.keys() != batched.keys():
        sys.exit(f"the two multiruns made different job dirs: {sorted(sequential.keys() ^ batched.keys())[:3]}")
    n_runs = len(sequential)
    seconds = {way: statistics.median(t) for way, t in times.items()}
    ratio = seconds["sequential"] / seconds[args.launcher]
    print(f"\n{n_runs} runs of {args.steps} steps; median wall time of {args.repeats} alternating repeat(s); "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    for way, value in seconds.items():
        print(f"{way:>12}: {value:8.1f} s  {3600 * n_runs / value:8.0f} runs per hour")
    print(f"\n{'job':<60} {'train loss alone':>16} {args.launcher:>16} {'val loss alone':>16} {args.launcher:>16}")
    for job, (train, val, outcome) in sequential.items():
        other = batched[job]
        flag = "" if outcome == other[2] else f"  outcome {outcome} vs {other[2]}"
        print(f"{job[:60]:<60} {show(train):>16} {show(other[0]):>16} {show(val):>16} {show(other[1]):>16}{flag}")
    if args.json:
        args.json.write_text(json.dumps({
            "overrides": overrides, "launcher": args.launcher, "jobs": args.jobs, "runs": n_runs, "steps": args.steps,
            "seconds": times, "median_seconds": seconds, "runs_per_hour": {w: 3600 * n_runs / s for w, s in
                                                                          seconds.items()},
            "ratio": ratio, "load_average_start": load, "losses": {"sequential": sequential, "batched": batched},
        }, indent=1))
    print(f"{ratio:.1f}x")


if __name__ == "__main__":
    main()
