"""The precision paths: the small preset in fp16 (GradScaler) and in bf16 trains 200 finite steps.

    python scripts/gpu/gpu_precision.py --json OUT/precision.json        # CUDA: model=small, 200 steps each
    python scripts/gpu/gpu_precision.py --dry-run                        # CPU: a tiny model, 10 steps each

Trains each precision with train.py in a fresh run dir (logger=none) and checks what the run
dir says (summary.json, metrics.jsonl): every step completed without divergence; every logged
train/loss finite; the loss fell (the last 10 steps' mean below the first 10's); fp16: at most
10% of the steps skipped by the scaler, and a final loss scale in [1, init_scale] (it cannot
grow within growth_interval = 2000 steps). Exits 1 if any check failed.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minilm.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[2]

PRECISIONS = ("fp16", "bf16")
COMMON = ["logger=none", "train.sample_tokens=0", "train.eval_interval=0", "train.ckpt_interval=0",
          "train.log_interval=10"]
GPU_RUN = ["model=small", "train.max_steps=200", "train.batch_size=8"]
DRY_RUN = ["model=tiny", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
           "train.max_steps=10", "train.batch_size=4", "train.eval_batches=1", "optim.warmup_steps=0",
           "data.max_files=40", "data.vocab_size=512"]
INIT_SCALE = 65536.0  # configs/precision/fp16.yaml
MAX_SKIPPED_FRACTION = 0.1


def checks(run_dir: Path, precision: str, max_steps: int) -> dict:
    """The outcome read back from the run dir, with each check's verdict under `checks`."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    scales = [r["amp/scale"] for r in rows if "amp/scale" in r]
    found = dict(steps=summary.get("step"), outcome=summary.get("outcome"), first_loss=losses[0] if losses else None,
                 last_loss=losses[-1] if losses else None, skipped_steps=summary.get("amp/skipped_steps"),
                 loss_scale=scales[-1] if scales else None)
    window = min(10, len(losses) // 2)
    verdicts = {
        "completed every step": found["outcome"] == "completed" and found["steps"] == max_steps,
        "every loss finite": len(losses) == max_steps and all(math.isfinite(v) for v in losses),
        "loss fell": window > 0 and statistics.mean(losses[-window:]) < statistics.mean(losses[:window]),
    }
    if precision == "fp16":
        verdicts["few skipped steps"] = (found["skipped_steps"] or 0) <= MAX_SKIPPED_FRACTION * max_steps
        verdicts["sane loss scale"] = found["loss_scale"] is not None and 1 <= found["loss_scale"] <= INIT_SCALE
    return dict(found, checks=verdicts, ok=all(verdicts.values()))


def train(precision: str, overrides: list[str], run_dir: Path) -> int:
    """train.py in run_dir; its output goes straight to ours (the section's log)."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"precision={precision}",
               f"hydra.run.dir={run_dir}"]
    print("$ " + " ".join(command[1:]), flush=True)
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny model for 10 steps (CPU)")
    parser.add_argument("--json", type=Path, help="write the outcome here")
    args = parser.parse_args()
    overrides = COMMON + (DRY_RUN if args.dry_run else GPU_RUN)
    max_steps = int(next(o for o in overrides if o.startswith("train.max_steps=")).split("=")[1])
    results = {}
    with tempfile.TemporaryDirectory(prefix="minilm-precision-") as runs:
        for precision in PRECISIONS:
            start = time.perf_counter()
            run_dir = Path(runs) / precision
            code = train(precision, overrides, run_dir)
            result = dict(returncode=code, seconds=time.perf_counter() - start)
            try:
                result.update(checks(run_dir, precision, max_steps))
            except (OSError, ValueError) as error:  # no summary / metrics: the run died early
                result.update(ok=False, error=f"{type(error).__name__}: {error}")
            result["ok"] = result["ok"] and code == 0
            results[precision] = result
            failed = [name for name, ok in result.get("checks", {}).items() if not ok]
            print(f"{'ok  ' if result['ok'] else 'FAIL'} {precision}: exit {code}, loss {result.get('first_loss')} -> "
                  f"{result.get('last_loss')}, skipped {result.get('skipped_steps')}, scale {result.get('loss_scale')}"
                  + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; {result['error']}" if "error" in result
                                                                           else ""), flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(overrides=overrides, results=results), indent=1))
    print(" ".join(f"{p} {'ok' if r['ok'] else 'FAILED'}" for p, r in results.items()))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
