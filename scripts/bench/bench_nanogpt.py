"""Per-step time of the default minilm run against nanoGPT's train.py at the same model, batch, optimizer
settings and data, in alternating runs.

    python scripts/bench/bench_nanogpt.py --nanogpt PATH/TO/nanoGPT [--steps 60] [--pairs 2] [--threads 1]

PATH is a checkout of github.com/karpathy/nanoGPT (its train.py, model.py, configurator.py; nothing of it
is part of this repository). Both train the default minilm shape (model=tiny: 4 layers, 4 heads, d_model
128, context 128, biases, no dropout, tied embeddings), batch 16, fp32 on CPU, AdamW lr 3e-3 with 50
warmup steps and cosine decay over train.max_steps to 3e-4, weight decay 0.1, betas (0.9, 0.95), clipping
at 1.0, on the same tokens: nanoGPT reads minilm's token cache (train.bin / val.bin, uint16) through a
data dir of links. nanoGPT prints each iteration's time; minilm logs perf/step_time_ms per flush window
(train.log_interval=10, diagnostics and forensics at their defaults, logger=none). The first window
(first 10 iterations) of each is left out; each run gives its median step, each pair a ratio, and the
figure is the median over the pairs. Differences that remain by
design: nanoGPT uses the non-fused (foreach) AdamW on CPU, minilm the fused one.
"""

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16)


def nanogpt_data(cache_dir: Path, work: Path) -> str:
    """A nanoGPT data dir whose train.bin / val.bin are minilm's token cache; returns the dataset name."""
    data = work / "data" / "minilm"
    data.mkdir(parents=True, exist_ok=True)
    meta = json.loads((cache_dir / "meta.json").read_text())
    if meta["dtype"] != "uint16":
        sys.exit(f"the token cache {cache_dir} holds {meta['dtype']} ids; nanoGPT reads uint16")
    for name in ("train.bin", "val.bin"):
        if not (data / name).exists():
            (data / name).symlink_to(cache_dir / name)
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": meta["vocab_size"]}))
    return "minilm"


def run_nanogpt(checkout: Path, work: Path, steps: int, env: dict) -> list[float]:
    args = {**SHAPE, "dataset": "minilm", "device": "cpu", "compile": False, "dtype": "float32", "bias": True,
            "dropout": 0.0, "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 50, "lr_decay_iters": steps,
            "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "max_iters": steps,
            "eval_interval": 10**9, "eval_iters": 1, "log_interval": 1, "always_save_checkpoint": False,
            "gradient_accumulation_steps": 1, "wandb_log": False, "out_dir": str(work / "out")}
    # nanoGPT's train.py reads configurator.py and data/<dataset> from the working directory: run it in `work`
    if not (work / "configurator.py").exists():
        (work / "configurator.py").symlink_to(checkout / "configurator.py")
    command = [sys.executable, str(checkout / "train.py"), *[f"--{k}={v}" for k, v in args.items()]]
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, env={
        **env, "PYTHONPATH": str(checkout)})
    if proc.returncode:
        sys.exit(f"nanoGPT failed: {proc.stderr[-2000:]}")
    iterations = re.findall(r"^iter (\d+): .* time ([\d.]+)ms", proc.stdout, re.M)
    return [float(ms) for it, ms in iterations if int(it) >= 10]


def run_minilm(work: Path, steps: int, env: dict) -> list[float]:
    run_dir = work / f"minilm-{time.time_ns()}"
    command = [sys.executable, str(ROOT / "train.py"), "logger=none", f"train.max_steps={steps}",
               "train.sample_tokens=0", "train.eval_interval=0", "optim.lr=3e-3", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"minilm failed: {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["perf/step_time_ms"] for row in rows if "perf/step_time_ms" in row and row["step"] > 10]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2, help="nanoGPT / minilm runs, alternating")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's own)")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").exists():
        sys.exit(f"--nanogpt {args.nanogpt}: no train.py there; pass a checkout of karpathy/nanoGPT")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    from minilm.data import prepare_data
    from minilm.launch.cli import compose

    cfg = compose([])
    cache = prepare_data(cfg.data, cfg.paths.cache_dir).cache_dir
    work = Path(tempfile.mkdtemp(prefix="bench_nanogpt-"))
    nanogpt_data(cache, work)
    ratios, medians = [], {"nanoGPT": [], "minilm": []}
    load = os.getloadavg()[0]
    for pair in range(args.pairs):
        nanogpt = statistics.median(run_nanogpt(args.nanogpt, work, args.steps, env))
        minilm = statistics.median(run_minilm(work, args.steps, env))
        medians["nanoGPT"].append(nanogpt)
        medians["minilm"].append(minilm)
        ratios.append(nanogpt / minilm)
        print(f"pair {pair + 1}: median step nanoGPT {nanogpt:.1f} ms, minilm {minilm:.1f} ms, minilm throughput "
              f"/ nanoGPT's {ratios[-1]:.2f}x", flush=True)
    print(f"threads {args.threads or 'default'}, load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} "
          f"at the end; {args.pairs} pair(s) of {args.steps}-step runs")
    for name, values in medians.items():
        print(f"{name:>8}: median step {statistics.median(values):.1f} ms (runs: "
              f"{', '.join(f'{v:.0f}' for v in values)})")
    print(f"minilm throughput / nanoGPT's, median over the pairs: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
