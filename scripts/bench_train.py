"""Training throughput for any config, and the framework's own overhead.

    python scripts/bench_train.py                          # default config
    python scripts/bench_train.py model=small precision=bf16 train.compile=true --steps 50

Runs the real Trainer (logging, diagnostics, checkpoint cadence as configured) and a
bare loop over the same model, optimizer, precision and batches (forward, backward,
step: nothing else), alternately `--repeats` times keeping the best of each, and prints tokens/s,
step time, the framework's overhead over the bare loop, and on CUDA the peak memory and MFU.

MFU = achieved model FLOP/s / the bf16 matmul rate measured on this device in the same
run (an 8192^3 matmul). Model FLOPs per token = 6 * N + 12 * n_layer * block_size * d_model
(N = parameters excluding embeddings; the second term is attention's q.k and p.v, forward
and backward; PaLM, Chowdhery et al. 2022, appendix B).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.cli import compose
from minilm.model import lm_loss
from minilm.trainer import Trainer, build_optimizer, lr_at


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(trainer: Trainer) -> float:
    m = trainer.cfg.model
    embeddings = sum(p.numel() for p in trainer.model.tok_emb.parameters())
    return 6 * (trainer.model.num_params() - embeddings) + 12 * m.n_layer * m.block_size * m.d_model


def measured_matmul_flops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def time_framework(trainer: Trainer, warmup: int, steps: int) -> float:
    """Seconds for `steps` steps of Trainer.fit after `warmup` steps, everything it does included."""
    trainer.fit(until_step=warmup)
    sync(trainer.device)
    start = time.perf_counter()
    trainer.fit(until_step=warmup + steps)
    sync(trainer.device)
    return time.perf_counter() - start


def time_bare_loop(trainer: Trainer, warmup: int, steps: int) -> float:
    """The same model, optimizer, precision and batches with nothing else around them."""
    model = trainer.train_model
    optimizer = build_optimizer(trainer.model, trainer.cfg.optim)
    precision, device = trainer.precision, trainer.device
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, trainer.cfg.optim, trainer.cfg.train.max_steps)
        for _ in range(trainer.cfg.train.grad_accum):
            x, y = trainer.next_batch()
            with precision.autocast():
                logits = model(x)
            precision.backward(lm_loss(logits, y).loss / trainer.cfg.train.grad_accum)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, caches)")
    parser.add_argument("--repeats", type=int, default=3, help="framework / bare-loop pairs; the best of each is kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cap_onednn_isa_if_amx_is_broken()

    overrides = [*args.overrides, f"train.max_steps={args.warmup + args.steps}", "train.sample_tokens=0"]
    if not any(o.startswith("logger") for o in args.overrides):
        overrides.append("logger=none")
    cfg = compose(overrides)
    framework_times, bare_times = [], []
    for _ in range(args.repeats):  # alternate the two, keep each one's best: machine noise only adds time
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir))
            device = trainer.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            framework_times.append(time_framework(trainer, args.warmup, args.steps))
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            bare_times.append(time_bare_loop(trainer, args.warmup, args.steps))
            trainer.close()
    framework_s, bare_s = min(framework_times), min(bare_times)

    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size * trainer.world_size
    result = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats, "tokens_per_step": tokens_per_step,
        "n_params": trainer.model.num_params(),
        "tokens_per_s": tokens_per_step * args.steps / framework_s,
        "step_time_ms": 1000 * framework_s / args.steps,
        "bare_tokens_per_s": tokens_per_step * args.steps / bare_s,
        "bare_step_time_ms": 1000 * bare_s / args.steps,
        "framework_overhead": framework_s / bare_s - 1,
        "peak_memory_mb": peak_mb,
    }
    if device.type == "cuda":
        peak = measured_matmul_flops(device)
        result["bf16_matmul_tflops_measured"] = peak / 1e12
        result["model_tflops_per_s"] = flops_per_token(trainer) * result["tokens_per_s"] / 1e12
        result["mfu"] = flops_per_token(trainer) * result["tokens_per_s"] / peak
    for key, value in result.items():
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
