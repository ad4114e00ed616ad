"""Our Triton LayerNorm / RMSNorm against torch eager, torch.compile and Liger-Kernel.

    python scripts/bench_norms.py --out bench/                    # full grid, CUDA GPU
    python scripts/bench_norms.py --out bench/ --norms rmsnorm    # a slice (each norm ~half the time)
    python scripts/bench_norms.py --quick --out /tmp/bench        # tiny shapes; on CPU via TRITON_INTERPRET=1

For every norm, dtype, rows M x hidden N and mode (fwd, bwd, fwd+bwd) it times each implementation
and reports achieved bandwidth from the minimum bytes moved -- forward reads x and writes y,
backward reads x and dy and writes dx -- as a fraction of the device-to-device copy bandwidth
measured in the same run. Our fp32 weight-gradient partials are counted separately (column
`partials_bytes` in the JSON), as is everyone's tiny weight/bias traffic (not counted).

GPU times are triton.testing.do_bench medians after warm-up; do_bench clears L2 before every
rep, and launching the next call overlaps that clearing, so launch overhead below ~80 us is
hidden. torch.compile gets static shapes (recompiled per shape, its strongest setting). Liger
is optional: pip install liger-kernel. On CPU (--quick) the timings are wall-clock medians of
interpreted kernels: they show that the script runs, nothing about speed.

Writes OUT/bench_norms.md (tables and the issue's targets, met or not) and OUT/bench_norms.json
(raw rows plus device, versions and copy bandwidth), rewritten after every shape so an
interrupted run keeps what it measured.
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402  (torch does not import triton, so TRITON_INTERPRET can still be set below)
import torch.nn.functional as F  # noqa: E402

NORMS = ("layernorm", "rmsnorm")
IMPLS = ("triton", "eager", "compile", "liger")
MODES = ("fwd", "bwd", "fwd+bwd")
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x, y | x, dy, dx | both
EPS = 1e-5
ROWS = (4096, 16384, 65536)
COLS = (128, 256, 384, 768, 1024, 2048, 4096, 8192)
EXTRA = [(dtype, 16384, n) for dtype in ("float16", "float32") for n in (256, 1024, 4096, 8192)]
QUICK = [("bfloat16", 64, 128), ("bfloat16", 16, 1000), ("float32", 16, 1000)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few reps (runs on CPU through the interpreter)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_norms.md and bench_norms.json")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--modes", default=",".join(MODES))
    return parser.parse_args()


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return QUICK
    return [("bfloat16", m, n) for m in ROWS for n in COLS] + EXTRA


class Unavailable(Exception):
    pass


def implementation(name: str, norm: str):
    """f(x, weight, bias) -> y for one implementation; raises Unavailable with the reason."""
    from minilm.norms import triton_ops

    if name == "triton":
        if norm == "rmsnorm":
            return lambda x, w, b: triton_ops.rms_norm(x, w, EPS)
        return lambda x, w, b: triton_ops.layer_norm(x, w, b, EPS)

    def eager(x, w, b):
        if norm == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), w, EPS)
        return F.layer_norm(x, (x.shape[-1],), w, b, EPS)

    if name == "eager":
        return eager
    if name == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: never the recompile limit's eager fallback
        return torch.compile(eager, dynamic=False)
    try:
        if norm == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w, b: LigerRMSNormFunction.apply(x, w, EPS)
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    except ImportError as error:
        raise Unavailable(f"liger-kernel not importable ({error})") from error


def timer(device: torch.device, quick: bool):
    """(name, ms(fn)): do_bench medians on CUDA, wall-clock medians on CPU."""
    if device.type == "cuda":
        import triton.testing

        def cuda_ms(fn):
            fn()
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=25 if quick else 100, return_mode="median")

        return "triton.testing.do_bench median, L2 cleared per rep", cuda_ms

    def wall_ms(fn):
        fn()  # warm-up (compilation)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return "wall-clock median of 3 after 1 warm-up (CPU: interpreted kernels; not a speed measurement)", wall_ms


def copy_gbps(device: torch.device, measure, quick: bool) -> float:
    numel = (16 << 20) if quick else (512 << 20)  # 1 GiB of bf16 on the GPU, like the largest x
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def run_case(norm, impl_name, dtype, rows, cols, device, measure, modes) -> list[dict]:
    """Times every mode of one implementation on one shape; errors become rows too."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (1 + 0.1 * torch.randn(cols, device=device, dtype=dtype, generator=gen)).requires_grad_()
    bias = None
    if norm == "layernorm":
        bias = (0.1 * torch.randn(cols, device=device, dtype=dtype, generator=gen)).requires_grad_()
    dy = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)  # Liger's RMSNorm may overwrite it
    leaves = [t for t in (x, weight, bias) if t is not None]
    out = []
    try:
        f = implementation(impl_name, norm)
        y = f(x, weight, bias)
        fns = {
            "fwd": lambda: f(x, weight, bias),
            "bwd": lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(f(x, weight, bias), leaves, dy),
        }
        for mode in modes:
            ms = measure(fns[mode])
            moved = TENSORS_MOVED[mode] * x.nbytes
            out.append(dict(mode=mode, ms=ms, bytes=moved, gbps=moved / ms / 1e6))
    except Exception as error:  # noqa: BLE001 -- one failing implementation must not stop the run
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        out.extend(dict(mode=mode, error=reason) for mode in modes if mode not in {r["mode"] for r in out})
    if impl_name == "triton" and device.type == "cuda":
        from minilm.norms.triton_ops import backward_plan

        buffers = len(leaves) - 1  # one [programs, N] fp32 partial per parameter, written once and read once
        partials = 2 * buffers * backward_plan(rows, cols, device).programs * cols * 4
        for row in out:
            if row["mode"] != "fwd":
                row["partials_bytes"] = partials
    dtype_name = str(dtype).removeprefix("torch.")
    return [dict(norm=norm, impl=impl_name, dtype=dtype_name, rows=rows, cols=cols, **r) for r in out]


def key(row: dict) -> tuple:
    return row["norm"], row["mode"], row["dtype"], row["rows"], row["cols"], row["impl"]


def cell(row: dict | None, copy: float) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error"
    return f"{row['ms'] * 1e3:.1f} us {100 * row['gbps'] / copy:.0f}%"


def tables(results: list[dict], impls: list[str], copy: float) -> str:
    """One markdown table per (norm, mode): time and % of copy bandwidth per implementation."""
    index = {key(r): r for r in results}
    lines, current = [], None
    for case in sorted({key(r)[:5] for r in results}, key=lambda c: (c[0], MODES.index(c[1]), *c[2:])):
        if case[:2] != current:
            current = case[:2]
            header = "| dtype | M | N | " + " | ".join(impls) + " | triton speedup vs best other |"
            lines += ["", f"### {' '.join(current)}", "", header, "|---" * (4 + len(impls)) + "|"]
        row = {impl: index.get(case + (impl,)) for impl in impls}
        ms = {impl: r["ms"] for impl, r in row.items() if r is not None and "ms" in r}
        others = [t for impl, t in ms.items() if impl != "triton"]
        speedup = f"{min(others) / ms['triton']:.2f}x" if "triton" in ms and others else ""
        cells = " | ".join(cell(row[i], copy) for i in impls)
        lines.append("| {} | {} | {} | ".format(*case[2:]) + cells + f" | {speedup} |")
    return "\n".join(lines)


def targets(results: list[dict], copy: float) -> str:
    """The issue's GPU targets (bf16 unless said), each with the shapes that miss it."""
    ms = {key(r): r["ms"] for r in results if "ms" in r}
    gbps = {key(r): r["gbps"] for r in results if "ms" in r}
    ours = [k[:5] for k in ms if k[5] == "triton"]
    bf16 = [k for k in ours if k[2] == "bfloat16"]

    def fraction(k):
        return gbps[k + ("triton",)] / copy

    def not_slower(k, impl):
        return k + (impl,) not in ms or ms[k + ("triton",)] <= ms[k + (impl,)]

    def check(title, keys, ok):
        misses = [" ".join(map(str, k)) for k in keys if not ok(k)]
        status = "no shape measured" if not keys else "met" if not misses else f"missed at {len(misses)} of {len(keys)}"
        return f"- {title}: {status}" + "".join(f"\n  - {miss}" for miss in misses)

    return "\n".join([
        "## Targets",
        check("forward >= 88% of copy bandwidth for N >= 1024",
              [k for k in bf16 if k[1] == "fwd" and k[4] >= 1024], lambda k: fraction(k) >= 0.88),
        check("backward >= 75% of copy bandwidth for N >= 1024",
              [k for k in bf16 if k[1] == "bwd" and k[4] >= 1024], lambda k: fraction(k) >= 0.75),
        check(">= 2x torch eager for N in 128..512",
              [k for k in bf16 if k[4] <= 512 and k + ("eager",) in ms],
              lambda k: ms[k + ("eager",)] >= 2 * ms[k + ("triton",)]),
        check("never slower than torch.compile or Liger (any dtype)",
              ours, lambda k: not_slower(k, "compile") and not_slower(k, "liger")),
    ])


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.quick:
            sys.exit("the full grid needs a CUDA GPU; on CPU run with --quick (kernels through TRITON_INTERPRET=1)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import triton

    norms, impls, modes = args.norms.split(","), args.impls.split(","), args.modes.split(",")
    timer_name, measure = timer(device, args.quick)
    copy = copy_gbps(device, measure, args.quick)
    try:
        liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger = None
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, liger_kernel=liger, quick=args.quick,
                timer=timer_name, eps=EPS, copy_gbps=copy)
    print(f"{meta['device']}: device-to-device copy {copy:.0f} GB/s; timer: {timer_name}", flush=True)
    results = []
    for dtype_name, rows, cols in shapes(args.quick):
        for norm in norms:
            for impl in impls:
                start = time.perf_counter()
                new = run_case(norm, impl, getattr(torch, dtype_name), rows, cols, device, measure, modes)
                results += new
                errors = {r["error"] for r in new if "error" in r}
                summary = ", ".join(f"{r['mode']} {r['ms'] * 1e3:.1f}us" for r in new if "ms" in r)
                summary += "".join(f" error: {e}" for e in errors)
                took = time.perf_counter() - start
                print(f"{norm:9s} {impl:7s} {dtype_name:8s} {rows:6d}x{cols:<5d} {summary} ({took:.0f}s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report = f"# Norm kernels on {meta['device']}\n\ncopy bandwidth {copy:.0f} GB/s; {timer_name}\n"
        report += tables(results, impls, copy) + "\n\n"
        report += (targets(results, copy) if device.type == "cuda" else "## Targets\n- judged on CUDA GPUs only") + "\n"
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench_norms.md").write_text(report)
            (args.out / "bench_norms.json").write_text(json.dumps(dict(meta, results=results), indent=1))
    print(report)


if __name__ == "__main__":
    main()
