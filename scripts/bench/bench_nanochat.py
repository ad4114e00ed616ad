"""Held-out loss and step time of minilm's recipes against nanochat's own model and optimizer, side by side in
one process, on the same token windows.

    python scripts/bench/bench_nanochat.py --nanochat PATH/TO/nanochat [overrides] [--lr-multipliers 0.0625,0.25,1]
                                           [--threads 1] [--json out.json]

PATH is a checkout of github.com/karpathy/nanochat (its nanochat/ package; nothing of it is part of this
repository). The rows, all at the shape of the minilm config the overrides give (default: model=tiny's 4 layers,
4 heads, d_model 128, context 128, 16 sequences a step, train.max_steps 600, fp32):

- nanochat xM: nanochat's `GPT` (nanochat/gpt.py) at that shape (n_kv_head = n_head, window_pattern "L": every
  layer sees the whole context, as nanochat's short windows would at context 128 anyway; vocabulary = minilm's
  tokenizer's) with its `setup_optimizer` (MuonAdamW, the single-process path: with no process group it skips
  all communication), trained the way scripts/base_train.py trains it: its LR defaults (embedding 0.3,
  unembedding 0.008, matrix 0.02, scalar 0.5) times M, its schedules (warmup 40 steps, warmdown over the last
  65% to 5%, Muon momentum 0.85 -> 0.97 over 400 steps and down to 0.90 in the warmdown, weight decay 0.28
  scaled by its batch / horizon rule and decayed by a cosine), no gradient clipping. Those LRs are tuned for
  2^19-token batches; base_train itself would scale them by sqrt(B / 2^19) (1/16 at 16 x 128 tokens), so
  M = 0.0625 is what nanochat's own rule picks and M = 1 its defaults unscaled. M multiplies the four LRs
  base_train's batch rule scales; the smear group's fixed 0.2 stays.
- minilm model=modern optim=muon, and the GPT-2 preset (the default config) with AdamW at its default LR,
  each through the real Run (train_step + the loop's after_step, as its fit runs them: diagnostics and
  forensics at their defaults, logger=none, evaluation and the checkpoint at the end only).

Every run trains on minilm's corpus and tokenizer, on the same batches in the same order (each its own
TokenWindowSampler over the same token cache with the run seed) and is evaluated on the Run's validation
windows. All runs step in blocks of train.log_interval steps in turn, the order rotating every round, so that
load from elsewhere on the machine falls on all alike; the first block and the last (the final evaluation
and checkpoint) are not timed. ms/step is the timed seconds over the timed steps; the ratios are each row's
ms/step over that of nanochat at its best multiplier.

One change to nanochat for this run, made in this process only: its optimizer's two step kernels
(`adamw_step_fused`, `muon_step_fused` in nanochat/optim.py) are decorated with torch.compile; they run
as the undecorated functions (`__wrapped__`) instead, the same math in eager mode, as minilm runs eager by
default (train.compile=false). NANOCHAT_DTYPE=float32, as minilm's default precision.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_train import alternate, framework_steps, start_framework

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.data import TokenWindowSampler, prepare_data
from minilm.errors import ConfigError, exit_on_input_error
from minilm.launch.cli import compose
from minilm.train.run import Run

# scripts/base_train.py's defaults: the LRs (argparse), B_REF and the d12 reference model its rules scale from
BASE_TRAIN = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28,
                  warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
B_REF = 2**19
MINILM_ROWS = {"minilm model=modern optim=muon": ["model=modern", "optim=muon"],
               "minilm GPT-2 preset + AdamW": []}
DEFAULT_MULTIPLIERS = "0.0625,0.125,0.25,0.5,1"


def import_nanochat(checkout: Path):
    """nanochat's gpt and optim modules from `checkout`, its optimizer's compiled kernels run eagerly."""
    if not (checkout / "nanochat" / "gpt.py").is_file():
        raise ConfigError(f"--nanochat {checkout}: no nanochat/gpt.py there; pass a checkout of karpathy/nanochat")
    os.environ["NANOCHAT_DTYPE"] = "float32"  # read when nanochat.common is imported
    sys.path.insert(0, str(checkout))
    import nanochat.gpt as gpt
    import nanochat.optim as optim

    unwrapped = []
    for name in ("adamw_step_fused", "muon_step_fused"):
        kernel = getattr(optim, name, None)
        if hasattr(kernel, "__wrapped__"):  # torch.compile keeps the function it wraps there
            setattr(optim, name, kernel.__wrapped__)
            unwrapped.append(name)
    return gpt, unwrapped


def checkout_commit(checkout: Path) -> str:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


class NanochatRun:
    """nanochat's model and optimizer at the minilm config's shape, trained as scripts/base_train.py's loop
    trains it (one micro-batch a step), on the batches a minilm run of `cfg` sees."""

    def __init__(self, gpt, cfg, data, multiplier: float, device: torch.device):
        m, t = cfg.model, cfg.train
        self.steps, self.step = t.max_steps, 0
        self.device = device
        self.sampler = TokenWindowSampler(data.train, m.block_size, t.batch_size, cfg.seed)
        config = partial(gpt.GPTConfig, sequence_len=m.block_size, vocab_size=data.vocab_size, window_pattern="L")
        torch.manual_seed(cfg.seed)
        with torch.device("meta"):  # as base_train builds it: shapes on meta, then storage, then init_weights
            self.model = gpt.GPT(config(n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_head, n_embd=m.d_model))
            reference = gpt.GPT(config(n_layer=12, n_head=6, n_kv_head=6, n_embd=768))  # base_train's d12
        self.model.to_empty(device=device)
        self.model.init_weights()
        batch_tokens = t.batch_size * m.block_size
        # base_train's rule: wd x sqrt(B / B_REF) x D_REF / D, D = 12 x (block matrices + LM head) of each model
        self.weight_decay = BASE_TRAIN["weight_decay"] * math.sqrt(batch_tokens / B_REF) \
            * scaling_params(reference) / scaling_params(self.model)
        lrs = {name: BASE_TRAIN[name] * multiplier
               for name in ("unembedding_lr", "embedding_lr", "matrix_lr", "scalar_lr")}
        self.optimizer = self.model.setup_optimizer(**lrs, weight_decay=self.weight_decay)

    # base_train's schedules (get_lr_multiplier, get_muon_momentum, get_weight_decay), num_iterations = steps
    def lr_multiplier(self, it: int) -> float:
        warmup, warmdown = BASE_TRAIN["warmup_steps"], round(BASE_TRAIN["warmdown_ratio"] * self.steps)
        if it < warmup:
            return (it + 1) / warmup
        if it <= self.steps - warmdown:
            return 1.0
        progress = (self.steps - it) / warmdown
        return progress + (1 - progress) * BASE_TRAIN["final_lr_frac"]

    def muon_momentum(self, it: int) -> float:
        warmdown = round(BASE_TRAIN["warmdown_ratio"] * self.steps)
        start = self.steps - warmdown
        if it < 400:
            return (1 - it / 400) * 0.85 + it / 400 * 0.97
        if it >= start:
            progress = (it - start) / warmdown
            return 0.97 * (1 - progress) + 0.90 * progress
        return 0.97

    def train(self, n: int) -> None:
        for _ in range(n):
            x, y = (t.to(self.device).contiguous() for t in self.sampler.next_batch())  # its loss views them
            loss = self.model(x, y)
            loss.backward()
            lrm, it = self.lr_multiplier(self.step), self.step
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = self.muon_momentum(it)
                    group["weight_decay"] = self.weight_decay * 0.5 * (1 + math.cos(math.pi * it / self.steps))
            self.optimizer.step()
            self.model.zero_grad(set_to_none=True)
            loss.item()  # base_train reads the loss every step
            self.step += 1

    @torch.no_grad()
    def evaluate(self, val_batches) -> float:
        """Mean cross-entropy over the batches, as Run.evaluate averages it."""
        self.model.eval()
        on_device = ((x.to(self.device).contiguous(), y.to(self.device).contiguous()) for x, y in val_batches)
        total = sum(self.model(x, y).item() for x, y in on_device)
        self.model.train()
        return total / len(val_batches)


def scaling_params(model) -> int:
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def compare(checkout: Path, overrides: list[str], multipliers: list[float], work: Path) -> dict:
    """Train every row to train.max_steps, alternating; their final val losses and step times."""
    gpt, unwrapped = import_nanochat(checkout)
    base = ["logger=none", "train.sample_tokens=0", "train.eval_interval=0", "train.ckpt_interval=0", *overrides]
    configs = {name: compose([*base, *extra]) for name, extra in MINILM_ROWS.items()}
    cfg = next(iter(configs.values()))
    shapes = {(c.model.n_layer, c.model.n_head, c.model.d_model, c.model.block_size, c.train.batch_size,
               c.train.max_steps, c.train.grad_accum, c.seed, c.data.vocab_size) for c in configs.values()}
    if len(shapes) != 1:
        raise ConfigError(f"the overrides {overrides} give the minilm rows different shapes, steps or seeds {shapes}; "
                          f"override only what all rows share")
    if cfg.train.max_steps < 3:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps}: the comparison needs at least 3 steps (an untimed "
                          f"first and last block around the timed ones)")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum}: the nanochat rows take one micro-batch a step; "
                          f"set train.grad_accum=1")
    data = prepare_data(cfg.data, cfg.paths.cache_dir)
    trainers = {name: Run(c, work / f"run{i}", data=data) for i, (name, c) in enumerate(configs.items())}
    device = next(iter(trainers.values())).device
    nanochat = {f"nanochat x{m:g}": NanochatRun(gpt, cfg, data, m, device) for m in multipliers}

    steps = cfg.train.max_steps
    block = max(1, min(cfg.train.log_interval, steps // 3))
    timed = block * ((steps - block) // block - 1)
    for trainer in trainers.values():
        start_framework(trainer, block)
    runners = {**{n: partial(framework_steps, tr) for n, tr in trainers.items()},
               **{n: run.train for n, run in nanochat.items()}}
    for run in nanochat.values():
        run.train(block)
    load = os.getloadavg()[0]
    seconds = alternate(runners, timed, block, device)
    for run in runners.values():  # the rest, untimed: the Runs evaluate and checkpoint at the last step
        run(steps - block - timed)

    val_batches = next(iter(trainers.values())).val_batches
    rows = {}
    for name, trainer in trainers.items():
        if trainer.step != steps or trainer.val_loss is None:
            raise RuntimeError(f"{name} stopped at step {trainer.step} of {steps} "
                               f"({trainer.final_outcome('completed')})")
        rows[name] = {"overrides": MINILM_ROWS[name], "val_loss": trainer.val_loss}
        trainer.end(trainer.final_outcome("completed"), None)
        trainer.close()
    seen = next(iter(trainers.values())).sampler.state_dict()
    for (name, run), m in zip(nanochat.items(), multipliers):
        if run.step != steps or run.sampler.state_dict() != seen:  # the same batches: the same sampler position
            raise RuntimeError(f"{name} at step {run.step}, sampler {run.sampler.state_dict()}; minilm's at {seen}")
        rows[name] = {"lr_multiplier": m, "val_loss": run.evaluate(val_batches), "weight_decay": run.weight_decay}
    for name, row in rows.items():
        row["ms_per_step"] = 1000 * seconds[name] / timed
    finite = [n for n in nanochat if math.isfinite(rows[n]["val_loss"])]
    best = min(finite, key=lambda n: rows[n]["val_loss"]) if finite else None
    for row in rows.values():
        row["ms_over_nanochat"] = row["ms_per_step"] / rows[best]["ms_per_step"] if best else None
        row["val_minus_nanochat"] = row["val_loss"] - rows[best]["val_loss"] if best else None
    m, t = cfg.model, cfg.train
    return {"nanochat_commit": checkout_commit(checkout), "nanochat_eager_kernels": unwrapped,
            "overrides": overrides, "shape": dict(n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
                                                  block_size=m.block_size, batch_size=t.batch_size,
                                                  vocab_size=data.vocab_size),
            "steps": steps, "timed_steps": timed, "block": block, "threads": torch.get_num_threads(),
            "device": str(device), "load_average": [load, os.getloadavg()[0]], "best_nanochat": best, "rows": rows}


def report(result: dict) -> str:
    rows, best = result["rows"], result["best_nanochat"]
    lines = [f"nanochat {result['nanochat_commit']} (run eager: {', '.join(result['nanochat_eager_kernels']) or '-'}),"
             f" shape {result['shape']}, {result['steps']} steps ({result['timed_steps']} timed), "
             f"{result['threads']} thread(s) on {result['device']}, load average {result['load_average'][0]:.2f} "
             f"at the start, {result['load_average'][1]:.2f} at the end",
             f"{'run':<34} {'val loss':>9} {'- nanochat':>10} {'ms/step':>8} {'/ nanochat':>10}"]
    for name, row in rows.items():
        delta = f"{row['val_minus_nanochat']:+.3f}" if best else "-"
        ratio = f"{row['ms_over_nanochat']:.2f}x" if best else "-"
        lines.append(f"{name:<34} {row['val_loss']:>9.4f} {delta:>10} {row['ms_per_step']:>8.1f} {ratio:>10}")
    if best:
        modern = rows["minilm model=modern optim=muon"]
        quality, speed = modern["val_minus_nanochat"], modern["ms_over_nanochat"]
        lines.append(f"against {best} (the best multiplier): model=modern optim=muon val loss {quality:+.3f} "
                     f"(bar: <= 0, {'met' if quality <= 0 else 'missed'}), ms/step {speed:.2f}x (bar: <= 1.1x, "
                     f"{'met' if speed <= 1.1 else 'missed'}); the GPT-2 preset + AdamW "
                     f"{rows['minilm GPT-2 preset + AdamW']['val_minus_nanochat']:+.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every minilm row (and so the shape)")
    parser.add_argument("--nanochat", type=Path, required=True, help="a checkout of karpathy/nanochat")
    parser.add_argument("--lr-multipliers", default=DEFAULT_MULTIPLIERS,
                        help=f"nanochat's LRs times each of these, one run each (default {DEFAULT_MULTIPLIERS})")
    parser.add_argument("--threads", type=int, help="torch threads for every run (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        multipliers = [float(m) for m in args.lr_multipliers.split(",")]
    except ValueError:
        raise ConfigError(f"--lr-multipliers {args.lr_multipliers}: write numbers separated by commas, "
                          f"e.g. {DEFAULT_MULTIPLIERS}") from None
    if not multipliers or any(not m > 0 for m in multipliers):
        raise ConfigError(f"--lr-multipliers {args.lr_multipliers}: every multiplier must be > 0")
    cap_onednn_isa_if_amx_is_broken()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_nanochat-") as work:
        result = compare(args.nanochat.resolve(), args.overrides, multipliers, Path(work))
    result["command"] = " ".join(["python", "scripts/bench/bench_nanochat.py", *(argv or sys.argv[1:])])
    result["wall_s"] = time.perf_counter() - start
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
