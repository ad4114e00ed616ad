"""What batching runs can buy on this device: one training step of a run alone, of M runs as a batched
ensemble, and of one run at M times the batch.

    python scripts/bench/bench_ensemble.py                          # size=tiny, 6 members
    python scripts/bench/bench_ensemble.py model=small precision=bf16 --members 3 --rounds 10

Three kinds of step, timed in turn, one of each per round in a shuffled order (so that load from
anything else on the machine falls on all of them alike), through the code a sweep runs:

    alone     Run.train_step of one run
    ensemble  Ensemble.step of M runs (minilm/train/ensemble.py: vmap forward and backward, each member's
              own optimizer, clipping and bookkeeping), per member
    folded    Run.train_step of one run at train.batch_size x M, per M: the same tokens in one
              model, which no ensemble can beat (it also shares the weights, so M runs' matmuls become
              M times larger ones, and pays the optimizer and bookkeeping once)

and prints the medians and the paired ratios alone / ensemble (what an ensemble speeds up a member's
step) and alone / folded (the most any batching of M runs could). Steps are timed to their end (a
CUDA device is synchronized); the overrides apply to all three (default: size=tiny diagnostics=off).
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.errors import input_errors
from minilm.launch.cli import compose
from minilm.train.ensemble import Ensemble
from minilm.train.run import Run

DEFAULT = ["size=tiny", "diagnostics=off"]


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides, as for train.py (default: {' '.join(DEFAULT)})")
    parser.add_argument("--members", type=int, default=6, help="M: runs in the ensemble")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cap_onednn_isa_if_amx_is_broken()

    overrides = [*(args.overrides or DEFAULT), f"train.max_steps={args.warmup + args.rounds}", "logger=none",
                 "train.eval_interval=0", "train.ckpt_interval=0"]
    cfg = compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        alone = Run(cfg, Path(tmp, "alone"))
        members = [Run(compose([*overrides, f"seed={i}"]), Path(tmp, f"member{i}"), own_rng=True)
                   for i in range(args.members)]
        ensemble = Ensemble(members)
        folded = Run(compose([*overrides, f"train.batch_size={cfg.train.batch_size * args.members}"]),
                     Path(tmp, "folded"))
        kinds = {"alone": alone.train_step, "ensemble": ensemble.step, "folded": folded.train_step}
        for step in kinds.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        shuffle = random.Random(0)
        for _ in range(args.rounds):
            for kind in shuffle.sample(list(kinds), len(kinds)):
                times[kind].append(timed(kinds[kind], alone.device))
        for trainer in (alone, *members, folded):
            trainer.close()

    per_run = {"alone": times["alone"], "ensemble": [t / args.members for t in times["ensemble"]],
               "folded": [t / args.members for t in times["folded"]]}
    print(f"overrides: {' '.join(overrides)}; device {alone.device}, {torch.get_num_threads()} threads; "
          f"{args.members} members; {args.rounds} timed steps of each kind")
    for kind, values in per_run.items():
        print(f"{kind:>10}: {1000 * statistics.median(values):8.2f} ms per run-step (median)")
    ratios = {kind: statistics.median(a / b for a, b in zip(per_run["alone"], per_run[kind]))
              for kind in ("ensemble", "folded")}
    for kind, ratio in ratios.items():
        print(f"alone / {kind}: {ratio:.2f}x (median of paired rounds)")
    if args.json:
        args.json.write_text(json.dumps({
            "overrides": overrides, "device": str(alone.device), "threads": torch.get_num_threads(),
            "members": args.members, "rounds": args.rounds, "seconds_per_run_step": per_run,
            "median_ms_per_run_step": {kind: 1000 * statistics.median(v) for kind, v in per_run.items()},
            "ratios": ratios}, indent=1))


if __name__ == "__main__":
    with input_errors():  # a bad override ends in its one line, not a traceback
        main()
