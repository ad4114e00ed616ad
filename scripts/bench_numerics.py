"""What the numerics telemetry (minilm.numerics) costs, as a fraction of training time.

    python scripts/bench_numerics.py                         # default config (tiny model, fp32)
    python scripts/bench_numerics.py precision=bf16 --rounds 50

Each round times, in a shuffled order, one bare training step and one sampled step: the
collector's extra forward + backward on a micro-batch, the training step, and the host fetch
of the collected metrics (what the trainer's next flush would pay). The median over rounds of
(sampled - bare) / bare is a sampled step's extra cost in bare steps; at diagnostics.interval N
the telemetry costs that / N. The trainer's own diag/* sampling is turned off to isolate it.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from minilm.cli import compose  # noqa: E402
from minilm.numerics import NumericsCollector  # noqa: E402
from minilm.trainer import Trainer  # noqa: E402


def timed(trainer: Trainer, collector: NumericsCollector | None) -> float:
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if collector is not None:
        x, y = trainer._to_device(trainer.sampler.next_batch())
        scale_loss = trainer.precision.scaler.scale if trainer.precision.uses_scaler else (lambda loss: loss)
        metrics = collector.observe(x, y, trainer.precision.autocast, scale_loss)
    trainer.train_step()
    if collector is not None:
        torch.stack(list(metrics.values())).tolist()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    steps = args.warmup + 2 * args.rounds
    cfg = compose([*args.overrides, f"train.max_steps={steps}", "logger=none", "optim.warmup_steps=0",
                   "diagnostics.interval=0"])
    times: dict[str, list[float]] = {"bare": [], "sampled": []}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        collector = NumericsCollector(trainer.model, cfg.precision.name)
        for _ in range(args.warmup):
            timed(trainer, collector)
        shuffle = random.Random(0)
        for _ in range(args.rounds):
            for kind in shuffle.sample(list(times), 2):
                times[kind].append(timed(trainer, collector if kind == "sampled" else None))

    extra = statistics.median((s - b) / b for b, s in zip(times["bare"], times["sampled"]))
    print(f"overrides: {' '.join(args.overrides) or '(default config)'}; device {trainer.device}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds; {len(collector.linears)} linears")
    for kind, values in times.items():
        print(f"{kind:>8} step: {1000 * statistics.median(values):8.2f} ms (median)")
    print(f"a sampled step costs {extra:.2f} bare steps more")
    for interval in (10, 25, 50, 100, 200):
        print(f"diagnostics.interval={interval:<4} numerics telemetry {100 * extra / interval:+.2f}%")


if __name__ == "__main__":
    main()
