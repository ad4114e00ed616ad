"""What QK-clip's per-step pass costs: the ms/step ratio of steps with optim.qk_clip_tau on and off.

    python scripts/bench/bench_qk_clip.py                                  # default config, Muon
    python scripts/bench/bench_qk_clip.py model=modern model.qk_norm=false --rounds 20

One Run (diagnostics off, so no step is sampled) runs steps with its QK-clip on and off in turn, in a
shuffled order per round, so that load from anything else on the machine falls on both alike; the median of
the per-round ratios (clip / plain) is printed. tau is set above any logit, so both kinds train alike and
only the measuring pass (and the clip's device math) is timed.
"""

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import torch
from bench_diagnostics import timed_step  # scripts/bench/ is on the path when run as a script

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.errors import input_errors
from minilm.launch.cli import compose
from minilm.train.run import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (default: optim=muon)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cap_onednn_isa_if_amx_is_broken()
    overrides = args.overrides or ["optim=muon"]
    steps = args.warmup + 2 * args.rounds
    cfg = compose([*overrides, f"train.max_steps={steps}", "logger=none", "diagnostics=off",
                   "optim.qk_clip_tau=1e30"])
    times: dict[str, list[float]] = {"clip": [], "plain": []}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Run(cfg, Path(run_dir))
        clip = trainer.qk_clip
        for _ in range(args.warmup):
            timed_step(trainer)
        shuffle = random.Random(0)
        for _ in range(args.rounds):
            for kind in shuffle.sample(list(times), 2):
                trainer.qk_clip = clip if kind == "clip" else None
                times[kind].append(timed_step(trainer))
        trainer.close()
    ratios = [c / p for c, p in zip(times["clip"], times["plain"])]
    print(f"overrides: {' '.join(overrides)}; device {trainer.device}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds")
    for kind, t in times.items():
        print(f"{kind:>6} step: {1000 * statistics.median(t):8.2f} ms (median)")
    print(f"qk-clip on / off: {statistics.median(ratios):.3f}x per step (median of per-round ratios; quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.3f} to {statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    with input_errors():  # a bad override ends in its one line, not a traceback
        main()
