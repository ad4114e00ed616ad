"""Training throughput for any config, and the framework's own overhead.

    python scripts/bench/bench_train.py                          # default config
    python scripts/bench/bench_train.py model=small precision=bf16 train.compile=true --steps 50
    python scripts/bench/bench_train.py model=small precision=bf16 --diagnostics-cost   # diagnostics on vs off
    python scripts/bench/bench_train.py --versus norm=dyt        # another config's step time over this one's

Runs a real Run (each step exactly as the loop, minilm/train/loop.py fit, runs it: logging, diagnostics,
forensics, evaluation and checkpoints at their intervals) and a bare loop over the same model, optimizer,
precision, batches and math (forward, backward, clip, step: nothing else), in alternating blocks of
train.log_interval steps (one flush window each), so that load from elsewhere on the machine falls on both
alike; `--repeats` such measurements keep the best of each. Prints tokens/s, step time, the framework's
overhead over the bare loop, and on CUDA the peak memory and MFU. With --diagnostics-cost a second Run with
diagnostics=off takes its turn in every round: the diagnostics' cost is on / off - 1, and the framework's
overhead without them is off / bare - 1; --versus OVERRIDES does the same for any overrides on top
(`versus_over_base`: its step time over the first config's, both timed in the same rounds). With
train.compile=true it counts Dynamo's graph breaks and recompiles during the first run (the steps a user's run
takes), and reports how long the first step took (mostly compilation).

MFU = achieved model FLOP/s / the bf16 matmul rate measured on this device in the same
run (an 8192^3 matmul, before training). --json is rewritten after every measurement, so a
run stopped early keeps what it measured. Model FLOPs per token = 6 * N + 12 * n_layer * block_size * d_model
(N = the parameters of every matmul, the LM head included, not the embedding lookups; the second
term is attention's q.k and p.v, forward and backward; PaLM, Chowdhery et al. 2022, appendix B).
"""

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken
from minilm.errors import input_errors
from minilm.launch.cli import compose
from minilm.model import lm_loss
from minilm.optim import build_optimizer, set_schedule
from minilm.train.lifecycle import StopSignals
from minilm.train.loop import Alone, after_step, fit, lap
from minilm.train.run import Run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(trainer: Run) -> float:
    """6 N + 12 n_layer T d: N counts every matmul weight, the LM head included (tied to the token embedding
    or not, it is a vocab x d_model matmul); the embedding lookups are no matmul and not counted."""
    m, model = trainer.cfg.model, trainer.model
    lookups = sum(e.weight.numel() for e in model.modules() if isinstance(e, torch.nn.Embedding)) \
        - (model.tok_emb.weight.numel() if model.cfg.tie_embeddings else 0)
    matmul_params = sum(p.numel() for p in model.parameters()) - lookups
    return 6 * matmul_params + 12 * m.n_layer * m.block_size * m.d_model


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


def start_framework(trainer: Run, warmup: int) -> float:
    """Train the first `warmup` steps through the loop's fit (no progress bar: the benchmark prints its own
    lines); returns the first step's seconds (compilation included). The run is then ready for
    `framework_steps`."""
    start = time.perf_counter()
    fit(Alone(trainer), until_step=1, progress=False)
    sync(trainer.device)
    first = time.perf_counter() - start
    fit(Alone(trainer), until_step=warmup, progress=False)
    return first


def framework_steps(trainer: Run, n: int) -> None:
    """n steps of exactly what the loop's fit does per step (the step, then minilm/train/loop.py after_step:
    flushes, evaluation, checkpoints), without its start and end of a run."""
    course, signals = lap(trainer, None), StopSignals()
    for _ in range(n):
        after_step(course, trainer.train_step(), signals, print)


def compile_counts() -> dict:
    """Dynamo's graph breaks and recompiles since the counters were last cleared."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    recompiles = [m.recompile_reason for m in get_compilation_metrics() if getattr(m, "recompile_reason", None)]
    breaks = counters["graph_break"]
    return {"graph_breaks": sum(breaks.values()), "graph_break_reasons": dict(breaks.most_common(5)),
            "recompiles": len(recompiles), "recompile_reasons": recompiles[:5],
            "unique_graphs": counters["stats"]["unique_graphs"], "frames_compiled": counters["frames"]["ok"]}


def clear_compile_counts() -> None:
    from torch._dynamo.utils import clear_compilation_metrics, counters

    counters.clear()
    clear_compilation_metrics()


def bare_loop(trainer: Run):
    """A function running n steps of the same model, optimizer, precision, batches and math (clipping
    included, as nanoGPT clips) with nothing else around them: no metrics, divergence checks, forensics,
    diagnostics or progress bar."""
    model = trainer.train_model
    optimizer = build_optimizer(trainer.model, trainer.cfg.optim, trainer.precision, trainer.cfg.seed)
    precision, train_cfg, step = trainer.precision, trainer.cfg.train, 0
    clip = train_cfg.grad_clip if train_cfg.grad_clip > 0 else float("inf")

    def steps(n: int) -> None:
        nonlocal step
        for _ in range(n):
            set_schedule(optimizer, step, trainer.cfg.optim, train_cfg.max_steps)
            for _ in range(train_cfg.grad_accum):
                x, y = trainer.next_batch()
                with precision.autocast():
                    logits = model(x)
                precision.backward(lm_loss(logits, y).loss / train_cfg.grad_accum)
            precision.unscale_(optimizer)
            precision.step(optimizer, precision.clip_grad_norm(list(trainer.model.parameters()), clip))
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return steps


def alternate(runners: dict, steps: int, block: int, device: torch.device) -> dict[str, float]:
    """Run each runner `block` steps at a time, in turn (the order rotating every round), until each ran
    `steps`; the seconds of each. Load from elsewhere on the machine falls on all of them alike, and each
    block is one flush window."""
    seconds, names = dict.fromkeys(runners, 0.0), list(runners)
    for round_ in range(max(1, steps // block)):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each runner leads in turn
            run = runners[name]
            sync(device)
            start = time.perf_counter()
            run(block)
            sync(device)
            seconds[name] += time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, caches)")
    parser.add_argument("--repeats", type=int, default=3, help="framework / bare-loop pairs; the best of each is kept")
    compared = parser.add_mutually_exclusive_group()
    compared.add_argument("--diagnostics-cost", action="store_true",
                          help="also time the run with diagnostics=off in every repeat")
    compared.add_argument("--versus", nargs="+", metavar="OVERRIDE", default=[],
                          help="also time a run with these overrides on top in every repeat, e.g. norm=dyt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cap_onednn_isa_if_amx_is_broken()

    # room for the bare loop's warmup too, and past the timed steps: no end-of-run evaluation or checkpoint in them
    overrides = [*args.overrides, f"train.max_steps={2 * args.warmup + args.steps + 100}", "train.sample_tokens=0"]
    if not any(o.startswith("logger") for o in args.overrides):
        overrides.append("logger=none")
    cfg = compose(overrides)
    versus = ["diagnostics=off"] if args.diagnostics_cost else args.versus
    cfg_versus = compose([*overrides, *versus]) if versus else None
    times = {"framework": [], "bare": [], "versus": []}
    # blocks of one flush window (fewer steps when --steps is smaller); the timed steps are whole blocks
    block = max(1, min(cfg.train.log_interval, args.steps))
    timed_steps = block * max(1, args.steps // block)
    measured = {}  # matmul rate, first run's compile figures, peak memory
    clear_compile_counts()

    def result() -> dict:
        framework_s, bare_s = min(times["framework"]), min(times["bare"])
        t = cfg.train
        tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size * trainer.world_size
        out = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "overrides": args.overrides, "steps": timed_steps, "repeats": len(times["framework"]),
            "tokens_per_step": tokens_per_step,
            "config": {"norm": cfg.norm.kind, "precision": cfg.precision.name, "compile": bool(t.compile),
                       "d_model": cfg.model.d_model, "n_layer": cfg.model.n_layer, "block_size": cfg.model.block_size,
                       "batch_size": t.batch_size},
            "n_params": trainer.model.num_params(),
            "tokens_per_s": tokens_per_step * timed_steps / framework_s,
            "step_time_ms": 1000 * framework_s / timed_steps,
            "bare_tokens_per_s": tokens_per_step * timed_steps / bare_s,
            "bare_step_time_ms": 1000 * bare_s / timed_steps,
            "framework_overhead": framework_s / bare_s - 1,
            "peak_memory_mb": measured["peak_memory_mb"],
            "first_step_s": measured["first_step_s"], "compile": measured["compile"],
        }
        if times["versus"] and args.diagnostics_cost:
            off_s = min(times["versus"])
            out["diagnostics_off_step_time_ms"] = 1000 * off_s / timed_steps
            out["diagnostics_overhead"] = framework_s / off_s - 1
            out["framework_overhead_without_diagnostics"] = off_s / bare_s - 1
        elif times["versus"]:
            versus_s = min(times["versus"])
            out.update(versus=versus, versus_step_time_ms=1000 * versus_s / timed_steps,
                       versus_over_base=versus_s / framework_s)
        if "matmul_flops" in measured:
            model_flops = flops_per_token(trainer) * out["tokens_per_s"]
            out["bf16_matmul_tflops_measured"] = measured["matmul_flops"] / 1e12
            out["model_tflops_per_s"] = model_flops / 1e12
            out["mfu"] = model_flops / measured["matmul_flops"]
        return out

    def save(stage: str) -> None:  # after every stage: a run stopped at a time cap keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(result(), indent=1))
        print(f"after {stage}: {one_line(result())}", flush=True)

    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as run_dir, tempfile.TemporaryDirectory() as versus_dir:
            trainer = Run(cfg, Path(run_dir))
            device = trainer.device
            if device.type == "cuda" and "matmul_flops" not in measured:
                measured["matmul_flops"] = measured_matmul_flops(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first_step_s = start_framework(trainer, args.warmup)
            if repeat == 0:
                measured.update(first_step_s=first_step_s, compile=compile_counts() if cfg.train.compile else None)
            runners = {"framework": partial(framework_steps, trainer)}
            if cfg_versus is not None:
                trainer_versus = Run(cfg_versus, Path(versus_dir))
                start_framework(trainer_versus, args.warmup)
                runners["versus"] = partial(framework_steps, trainer_versus)
            bare = bare_loop(trainer)
            bare(args.warmup)
            runners["bare"] = bare
            seconds = alternate(runners, timed_steps, block, device)
            for name, value in seconds.items():
                times[name].append(value)
            measured["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 \
                if device.type == "cuda" else None
            trainer.close()
            if cfg_versus is not None:
                trainer_versus.close()
        save(f"repeat {repeat + 1}")

    final = result()
    for key, value in final.items():
        print(f"{key:>38}: {value:.4g}" if isinstance(value, float) else f"{key:>38}: {value}")
    print(one_line(final))


def one_line(result: dict) -> str:
    """The headline figures in one line (the GPU check's PASS line shows it)."""
    parts = [f"{result['tokens_per_s']:.4g} tokens/s", f"overhead {100 * result['framework_overhead']:+.1f}%"]
    if "mfu" in result:
        parts.insert(1, f"MFU {100 * result['mfu']:.1f}%")
    if "diagnostics_overhead" in result:
        parts.append(f"diagnostics {100 * result['diagnostics_overhead']:+.1f}%")
    if "versus_over_base" in result:
        parts.append(f"{' '.join(result['versus'])}: {result['versus_over_base']:.3f}x the step time")
    if result.get("compile"):
        parts.append(f"graph breaks {result['compile']['graph_breaks']}, recompiles {result['compile']['recompiles']}, "
                     f"first step {result['first_step_s']:.0f} s")
    return ", ".join(parts)


if __name__ == "__main__":
    with input_errors():  # a bad override ends in its one line, not a traceback
        main()
