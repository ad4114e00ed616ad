"""Every Triton norm kernel against a float64 reference: the GPU check's correctness sweep.

    python scripts/gpu/gpu_correctness.py --json OUT/correctness.json        # CUDA: the full size grid
    TRITON_INTERPRET=1 python scripts/gpu/gpu_correctness.py --dry-run       # CPU: tiny sizes, interpreted
    python scripts/gpu/gpu_correctness.py --sanitize                         # compute-sanitizer memcheck

For LayerNorm, RMSNorm and DyT, fp32 / fp16 / bf16, every hidden size, forward and backward, on both
kernel paths ("fused": the launch heuristics as shipped, which already take the looped path above
the fused limits; "looped": the fused limits lowered to 0, so every size runs the looped kernels).
DyT has one path (elementwise tiles; rows longer than LOOP_BLOCK_N in column chunks), checked once:

- random rows, 8192 of them (at most 2^25 elements), enough that short rows share a program and
  persistent backward programs take several tiles;
- hard rows, each kind in its own small batch (errors are relative to the batch's largest term):
  a large offset with a small spread (exact multiples of the ulp; x - mean is not representable
  in the naive order), 1e30 (bf16 / fp32: the squares overflow fp32), constant rows (variance 0),
  1e-30 with eps = 0 (bf16 / fp32: the squares underflow);
- determinism: the random case computed twice must be bitwise equal (DyT's dalpha included).

Errors are measured and judged as in tests/test_triton_norms.py (minilm/norms/reference.py). One
worker process per (norm, dtype), so Triton compiles in parallel. Prints one line per case and
rewrites --json after every finished worker; exits 1 if any case failed.

--sanitize runs one fused and one looped forward + backward per norm (DyT: its one path; --smoke) under
compute-sanitizer's memcheck: exit 0 clean, 1 when it reports errors, 3 (skipped) when the tool is
missing, there is no GPU, or the tool itself did not complete (some container runtimes refuse it).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from minilm.norms import triton_ops
from minilm.norms.reference import (
    DEVICE,
    DTYPES,
    NORMS,
    TOL,
    forward_backward,
    make_params,
    random_inputs,
    triton_errors,
    triton_norm,
)

SIZES = (64, 128, 768, 1000, 1024, 4096, 5120, 8192, 16384)
DRY_RUN_SIZES = (64, 1000)
ROWS, DRY_RUN_ROWS = 8192, 4
MAX_ELEMENTS = 2**25  # the float64 reference of 9 workers at once stays within a few GB each
HARD_ROWS = 4
EPS = 1e-5
PATHS = ("fused", "looped")
SANITIZER_ERRORS = 86  # memcheck's exit status when it found errors (distinct from a failing program)
SKIP = 3  # the GPU check's "skipped" status


@contextlib.contextmanager
def kernel_path(path: str):
    """'looped': lower both fused limits to 0 for the duration, so every size takes the looped kernels."""
    saved = triton_ops.FORWARD, triton_ops.BACKWARD
    if path == "looped":
        triton_ops.FORWARD = dataclasses.replace(saved[0], max_fused_n=0)
        triton_ops.BACKWARD = dataclasses.replace(saved[1], max_fused_n=0)
    try:
        yield
    finally:
        triton_ops.FORWARD, triton_ops.BACKWARD = saved


def paths(norm: str) -> tuple[str, ...]:
    return ("fused",) if norm == "dyt" else PATHS


def kernels_used(norm: str, m: int, n: int) -> str:
    """Which forward / backward kernels the current limits pick for an (m, n) input."""
    if norm == "dyt":
        chunks = triton_ops.dyt_config(triton_ops.FORWARD, m, n, torch.device(DEVICE))[2]
        return f"{chunks} column chunk{'s' if chunks > 1 else ''}"
    forward = "fused" if n <= triton_ops.FORWARD.max_fused_n else "looped"
    backward = "looped" if triton_ops.backward_plan(m, n, torch.device(DEVICE)).looped else "fused"
    return f"fwd {forward}, bwd {backward}"


def hard_rows(kind: str, dtype: torch.dtype, n: int, gen: torch.Generator):
    """(x, eps) of one hard kind, or None where the dtype cannot express it."""
    shape = (HARD_ROWS, n)
    wide = dtype in (torch.float32, torch.bfloat16)  # fp16 has no 1e30 and flushes 1e-30 to zero
    if kind == "offset":  # 2^(mantissa bits + 4): its ulp is 16, so offset + 16 * k is exact for k < 64
        offset = 16 / torch.finfo(dtype).eps
        return (offset + 16 * torch.randint(0, 64, shape, generator=gen).double()).to(dtype), EPS
    if kind == "huge" and wide:
        return (1e30 * torch.randn(shape, generator=gen)).to(dtype), EPS
    if kind == "constant":
        return torch.full(shape, 3.0, dtype=dtype), EPS
    if kind == "tiny_eps0" and wide:
        return (1e-30 * torch.randn(shape, generator=gen)).to(dtype), 0.0
    return None


HARD_KINDS = ("offset", "huge", "constant", "tiny_eps0")


def judge(case: dict, errors: dict, tol: float) -> dict:
    case.update(errors=errors, tol=tol, ok=all(e <= tol for e in errors.values()))
    return case


def check_random(norm, dtype, m, n) -> dict:
    x, dy, weight, bias = random_inputs(norm, dtype, (m, n), "fp32")
    case = dict(rows=m, kernels=kernels_used(norm, m, n))
    first, second = (forward_backward(triton_norm, norm, x, weight, bias, EPS, dy) for _ in range(2))
    judge(case, triton_errors(norm, x, dy, weight, bias, EPS, ours=first), TOL[dtype])
    case["bitwise_deterministic"] = all(a is b is None or torch.equal(a, b) for a, b in zip(first, second))
    case["ok"] = case["ok"] and case["bitwise_deterministic"]
    return case


def check_hard(norm, dtype, kind, n) -> dict | None:
    gen = torch.Generator().manual_seed(1)
    made = hard_rows(kind, dtype, n, gen)
    if made is None:
        return None
    x, eps = made
    x = x.to(DEVICE)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    weight, bias = make_params(norm, n, "fp32", dtype, gen)
    case = dict(rows=HARD_ROWS, eps=eps, kernels=kernels_used(norm, HARD_ROWS, n))
    return judge(case, triton_errors(norm, x, dy, weight, bias, eps), TOL[dtype])


def describe(row: dict) -> str:
    head = f"{row['norm']:9s} {row['dtype']:8s} N={row['n']:<5d} {row['path']:6s} {row['case']:9s}"
    if "error" in row:
        return f"FAIL {head} {row['error']}"
    worst = max(row["errors"], key=row["errors"].get)
    text = f"{head} worst {worst} {row['errors'][worst]:.2e} (tol {row['tol']:.1e}) [{row['kernels']}]"
    if "bitwise_deterministic" in row:
        text += " bitwise-deterministic" if row["bitwise_deterministic"] else " NOT DETERMINISTIC"
    return ("ok   " if row["ok"] else "FAIL ") + text


def run_unit(norm: str, dtype_name: str, sizes: tuple[int, ...], rows: int) -> list[dict]:
    """Every size, path and case of one (norm, dtype); an exception fails its case, not the unit."""
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy overflow in the interpreter (hard rows)
    dtype = getattr(torch, dtype_name)
    results = []
    for n in sizes:
        for path in paths(norm):
            with kernel_path(path):
                checks = [("random", check_random, (norm, dtype, min(rows, MAX_ELEMENTS // n), n))]
                checks += [(kind, check_hard, (norm, dtype, kind, n)) for kind in HARD_KINDS]
                for case, check, check_args in checks:
                    row = dict(norm=norm, dtype=dtype_name, n=n, path=path, case=case)
                    try:
                        found = check(*check_args)
                    except Exception as error:  # noqa: BLE001 -- report it and go on with the next case
                        found = dict(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
                    if found is None:
                        continue
                    row.update(found)
                    results.append(row)
                    print(describe(row), flush=True)
    return results


def smoke() -> None:
    """One fused and one looped forward + backward per norm (DyT: its one path) at a small ragged shape
    (the sanitizer's target)."""
    calls = 0
    for norm in NORMS:
        for path in paths(norm):
            with kernel_path(path):
                x, dy, weight, bias = random_inputs(norm, torch.bfloat16, (37, 1000), "fp32")
                forward_backward(triton_norm, norm, x, weight, bias, EPS, dy)
                calls += 1
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"smoke: {calls} forward + backward calls done")


def sanitize() -> int:
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if Path(p).exists()), None)
    if DEVICE != "cuda":
        print("skipped: no CUDA GPU")
        return SKIP
    if tool is None:
        print("skipped: compute-sanitizer is neither on PATH nor in /usr/local/cuda/bin")
        return SKIP
    command = [tool, "--tool", "memcheck", "--error-exitcode", str(SANITIZER_ERRORS), sys.executable, __file__,
               "--smoke"]
    code = subprocess.run(command, check=False).returncode
    if code == 0:
        print("memcheck: no errors in one fused and one looped forward + backward per norm (DyT: one)")
        return 0
    if code == SANITIZER_ERRORS:
        print("memcheck reported errors (above)")
        return 1
    print(f"skipped: compute-sanitizer did not complete (exit {code}; its output is above)")
    return SKIP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help=f"sizes {DRY_RUN_SIZES}, {DRY_RUN_ROWS} rows")
    parser.add_argument("--json", type=Path, help="write every case here")
    parser.add_argument("--jobs", type=int, default=len(NORMS) * len(DTYPES),
                        help="worker processes (Triton compiles in each); default one per (norm, dtype)")
    parser.add_argument("--smoke", action="store_true", help="one fused and one looped call per norm, then exit")
    parser.add_argument("--sanitize", action="store_true", help="--smoke under compute-sanitizer memcheck")
    args = parser.parse_args()
    if args.sanitize:
        sys.exit(sanitize())
    if DEVICE == "cpu" and not triton_ops.INTERPRETED:
        sys.exit("no CUDA GPU: run with TRITON_INTERPRET=1 (and --dry-run) to check the kernels on CPU")
    if args.smoke:
        return smoke()
    sizes, rows = (DRY_RUN_SIZES, DRY_RUN_ROWS) if args.dry_run else (SIZES, ROWS)

    import triton

    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, dry_run=args.dry_run, sizes=sizes,
                rows=rows, hard_rows=HARD_ROWS, paths=PATHS)
    units = [(norm, str(dtype).removeprefix("torch.")) for norm in NORMS for dtype in DTYPES]
    start, results = time.perf_counter(), []
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
        futures = {pool.submit(run_unit, norm, dtype, sizes, rows): (norm, dtype) for norm, dtype in units}
        for future in concurrent.futures.as_completed(futures):
            try:
                results += future.result()
            except Exception as error:  # noqa: BLE001 -- a crashed worker fails its unit, the others go on
                norm, dtype = futures[future]
                row = dict(norm=norm, dtype=dtype, n=0, path="-", case="worker", ok=False,
                           error=f"the worker for {norm} {dtype} died: {type(error).__name__}: {error}")
                results.append(row)
                print(describe(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(meta, complete=False, cases=results), indent=1))
    failed = [r for r in results if not r["ok"]]
    if args.json:
        args.json.write_text(json.dumps(dict(meta, complete=True, cases=results), indent=1))
    print(f"{len(results)} cases, {len(failed)} failed, in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
