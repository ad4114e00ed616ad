"""Step time of model variants, as ratios to the first, timed in interleaved rounds in one process.

    python scripts/bench/bench_model.py                                   # GPT-2 preset vs model=modern
    python scripts/bench/bench_model.py --variants "" "model=modern" "model=modern model.attn_softcap=50"
    python scripts/bench/bench_model.py --rounds 5 --steps 3 -- size=tiny    # overrides shared by every variant

Each variant is the model and AdamW a run with those overrides builds (the schema's batch and context), on
random tokens, fp32 on CPU or the precision's autocast: forward, loss, backward, optimizer step, nothing else
(no diagnostics, no data loading). Every round times `--steps` steps of each variant in turn after one
untimed step, so load from elsewhere on the machine falls on all of them alike; the figure per variant is
its median step over the rounds, and the ratio is that over the first variant's. On a CPU the clock is the
process's CPU time on one thread (torch.set_num_threads(1)): on a shared machine, wall time mostly measures
the other processes; on CUDA it is wall time, synchronized.
"""

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from minilm.errors import input_errors
from minilm.launch.cli import compose
from minilm.model import GPT, lm_loss
from minilm.optim import build_optimizer
from minilm.precision.policy import Precision


def build(overrides: list[str], device: torch.device):
    cfg = compose(overrides)
    torch.manual_seed(0)
    model = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), cfg.data.vocab_size).to(device)
    precision = Precision(OmegaConf.to_object(cfg.precision), device)
    optimizer = build_optimizer(model, cfg.optim, precision, cfg.seed)
    tokens = torch.randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.model.block_size + 1), device=device)

    def step() -> None:
        with precision.autocast():
            logits = model(tokens[:, :-1])
        lm_loss(logits, tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["", "model=modern"],
                        help="one string of space-separated overrides per variant ('' is the default config)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("common", nargs="*", help="overrides shared by every variant")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cpu":
        torch.set_num_threads(1)
    steps = [build([*args.common, *variant.split()], device) for variant in args.variants]
    for step in steps:
        step()  # first-call costs out of the timing
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.rounds):
        for step, record in zip(steps, times):
            start = clock()
            for _ in range(args.steps):
                step()
            record.append((clock() - start) / args.steps * 1e3)
    base = statistics.median(times[0])
    for variant, record in zip(args.variants, times):
        ms = statistics.median(record)
        print(f"{ms:9.1f} ms/step ({'wall' if device.type == 'cuda' else 'CPU, one thread'})  {ms / base:5.2f}x  "
              f"{variant or '(default: the GPT-2 preset)'}")


if __name__ == "__main__":
    with input_errors():  # a bad override ends in its one line, not a traceback
        main()
