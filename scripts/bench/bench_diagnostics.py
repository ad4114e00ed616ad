"""What the stability diagnostics and forensics cost, as a fraction of training time.

    python scripts/bench/bench_diagnostics.py                      # default config
    python scripts/bench/bench_diagnostics.py model=small precision=bf16 --rounds 10

One run runs four kinds of step in turn, step by step, so that load from anything else
on the machine falls on all of them alike:

    bare       diagnostics.interval=0, forensics off
    forensics  forensics on (what every step pays by default)
    diag       forensics on and the step sampled, without the numerics telemetry
    sampled    forensics on and the step sampled, numerics included (what a step at
               diagnostics.interval pays by default)

Each round times one step of each kind back to back, in a shuffled order (so that no kind
always follows a heavier sampled step); per round, forensics' cost is forensics / bare - 1 and
a sampled step's extra cost is (sampled - forensics) / bare, of which (sampled - diag) / bare is
the numerics telemetry's. Their medians over the rounds (paired, so slow drifts in machine load
cancel) give the overhead of interval N as  sampled_extra / N + forensics_cost,  printed for a
few N.
The metrics flush's share (host-side spike scores, one more small fetch) is left out: it is
once per train.log_interval steps and microseconds long.
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.errors import input_errors
from minilm.launch.cli import compose
from minilm.train.run import Run

# (diagnostics interval, forensics, numerics telemetry)
KINDS = {"bare": (0, False, False), "forensics": (0, True, False), "diag": (1, True, False), "sampled": (1, True, True)}


def timed_step(trainer: Run) -> float:
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start = time.perf_counter()
    trainer.train_step()
    trainer.diagnostics.collect()  # what the next flush would fetch: part of the sampled step's cost
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cap_onednn_isa_if_amx_is_broken()

    steps = args.warmup + args.rounds * len(KINDS)
    cfg = compose([*args.overrides, f"train.max_steps={steps}", "logger=none", "optim.warmup_steps=0"])
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Run(cfg, Path(run_dir))
        numerics = trainer.numerics
        for _ in range(args.warmup):
            timed_step(trainer)
        shuffle = random.Random(0)
        for _ in range(args.rounds):
            for kind in shuffle.sample(list(KINDS), len(KINDS)):
                trainer.diagnostics.interval, trainer.forensics.enabled, with_numerics = KINDS[kind]
                trainer.numerics = numerics if with_numerics else None
                times[kind].append(timed_step(trainer))
        trainer.close()

    ms = {kind: 1000 * statistics.median(t) for kind, t in times.items()}
    rounds = list(zip(times["bare"], times["forensics"], times["sampled"]))
    numerics_extra = statistics.median((s - d) / b for b, d, s in zip(times["bare"], times["diag"], times["sampled"]))
    forensics_costs = [f / b - 1 for b, f, _ in rounds]
    forensics_cost = statistics.median(forensics_costs)
    # standard error of a median: how small a cost these step times can resolve at all
    resolution = 1.2533 * statistics.stdev(forensics_costs) / len(rounds) ** 0.5
    sampled_extra = statistics.median((s - f) / b for b, f, s in rounds)  # in bare steps
    print(f"overrides: {' '.join(args.overrides) or '(default config)'}; device {trainer.device}, "
          f"{torch.get_num_threads()} threads; {len(times['bare'])} timed steps of each kind")
    for kind, value in ms.items():
        quartiles = statistics.quantiles(times[kind], n=4)
        print(f"{kind:>10} step: {value:8.2f} ms (median; quartiles {1000 * quartiles[0]:.2f} to "
              f"{1000 * quartiles[2]:.2f})")
    print(f"forensics per step: {100 * forensics_cost:+.2f}% (+-{100 * resolution:.2f}% at this noise); "
          f"one sampled step costs {sampled_extra:.2f} bare steps more, {numerics_extra:.2f} of them the numerics "
          f"telemetry")
    for interval in (10, 25, 50, 100, 200):
        sampling = sampled_extra / interval
        print(f"diagnostics.interval={interval:<4} sampling {100 * sampling:+.2f}%, "
              f"with forensics {100 * (sampling + forensics_cost):+.2f}%")


if __name__ == "__main__":
    with input_errors():  # a bad override ends in its one line, not a traceback
        main()
