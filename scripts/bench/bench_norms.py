"""Our Triton LayerNorm / RMSNorm / DyT against torch eager, torch.compile and Liger-Kernel: bandwidth.

    python scripts/bench/bench_norms.py --json OUT/bench_norms.json          # CUDA GPU: the grid below
    python scripts/bench/bench_norms.py --norms rmsnorm --modes fwd          # a slice
    TRITON_INTERPRET=1 python scripts/bench/bench_norms.py --quick           # CPU: tiny shapes, interpreted

Grid: LayerNorm and RMSNorm, hidden N in {128, 768, 1024, 4096, 8192}, bf16 and fp32 (fp32 is what
the block norms receive under bf16 autocast: the residual stream stays fp32), each x 64 MiB (rows
= 64 MiB / row bytes), modes fwd, bwd and fwd+bwd, weight and bias in x's dtype. DyT (alpha 0.5,
its gradient included in the backward) at the same N in bf16 only, where the goals are judged:
the GPU check's time budget has no room for its fp32 row.

Timing. Python dispatch of one custom-op call costs tens of microseconds, as long as the kernel
itself at a few thousand rows, so kernels are timed without it: CALLS calls are captured in one
CUDA graph, cycling through RING input sets (together several times the L2 cache, so no call
reads what the previous one left in L2), and the graph is replayed; GPU time per call = the
median replay / CALLS. The host time of CALLS plain calls (launched without a graph, before
any synchronization) is reported separately as dispatch per call: a kernel faster than that is
dispatch-bound in eager code.

Bandwidth counts the minimum bytes moved: forward reads x and writes y; backward reads x and dy
and writes dx (weight / bias traffic is tiny and not counted; our fp32 weight-gradient partials
are reported in `partials_bytes`). Fractions are of the device-to-device copy bandwidth measured
in this run, the same way, at x's size and at 1 GiB (the larger of the two).

torch.compile gets static shapes (compiled per shape, its strongest setting); Liger-Kernel runs
with its defaults (its RMSNorm backward writes dx into dy) and is skipped when not importable.
Before timing, every implementation is compiled once per shape in parallel worker processes
(--warm-jobs): the timing run then loads Triton and Inductor kernels from their disk caches.

On CPU (--quick) times are wall-clock medians of interpreted kernels, torch.compile uses the
aot_eager backend (no C++ code generation): this shows the script works, nothing about speed.
Writes --json after every shape (an interrupted run keeps what it measured), with the goals
judged in `goals`; `markdown()` renders the tables (scripts/gpu/gpu_results.py uses it).
"""

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch  # torch does not import triton: TRITON_INTERPRET still works when set by the caller
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm", "dyt")
ONLY_DTYPES = {"dyt": ("bfloat16",)}  # norms timed at fewer dtypes than the grid's
IMPLS = ("triton", "eager", "compile", "liger")
MODES = ("fwd", "bwd", "fwd+bwd")
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x, y | x, dy, dx | both
EPS = 1e-5
COLS = (128, 768, 1024, 4096, 8192)
DTYPES = ("bfloat16", "float32")
X_BYTES = 64 << 20
QUICK = [("bfloat16", 64, 128), ("float32", 16, 1000)]
RING = 4  # input sets cycled through: fwd+bwd touches 4 x 64 MiB per set, 1 GiB in all, many times L2
CALLS = 20  # calls per CUDA graph
REPLAYS = 10

# The goals the figures are held to (a benchmark, not a test): (id, text).
GOALS = {
    "fwd_85": "bf16, N >= 1024: forward >= 85% of copy bandwidth",
    "fwdbwd_70": "bf16, N >= 1024: forward+backward >= 70% of copy bandwidth",
    "small_2x_eager": "bf16, N = 128..512: >= 2x torch eager (every mode)",
    "not_slower": "never slower than torch.compile or Liger (every shape, dtype and mode)",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (kernels through the interpreter)")
    parser.add_argument("--json", type=Path, default=None, help="write results and goals here")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--warm-jobs", type=int, default=8,
                        help="processes that compile every shape before timing (CUDA only; 0: compile while timing)")
    return parser.parse_args()


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(dtype, rows, cols): x is X_BYTES on the GPU."""
    if quick:
        return QUICK
    return [(d, X_BYTES // (n * getattr(torch, d).itemsize), n) for d in DTYPES for n in COLS]


def timed(norm: str, dtype_name: str) -> bool:
    return dtype_name in ONLY_DTYPES.get(norm, DTYPES)


class Unavailable(Exception):
    pass


def implementation(name: str, norm: str, device: torch.device):
    """f(x, *params) -> y for one implementation (params as `inputs` makes them); raises Unavailable
    with the reason."""
    from minilm.norms import triton_ops
    from minilm.norms.dyt import dyt

    if name == "triton":
        if norm == "dyt":
            return triton_ops.dyt
        if norm == "rmsnorm":
            return lambda x, w: triton_ops.rms_norm(x, w, EPS)
        return lambda x, w, b: triton_ops.layer_norm(x, w, b, EPS)

    def eager(x, *params):
        if norm == "dyt":
            return dyt(x, *params)
        if norm == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), *params, EPS)
        return F.layer_norm(x, (x.shape[-1],), *params, EPS)

    if name == "eager":
        return eager
    if name == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: never the recompile limit's eager fallback
        return torch.compile(eager, dynamic=False, backend="inductor" if device.type == "cuda" else "aot_eager")
    try:
        if norm == "dyt":
            from liger_kernel.ops.dyt import LigerDyTFunction

            return LigerDyTFunction.apply
        if norm == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS)
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    except ImportError as error:
        raise Unavailable(f"liger-kernel not importable ({error})") from error


def inputs(norm, dtype, rows, cols, device, sets):
    """(params, pairs): the parameters every call shares, in the order the norm takes them (weight; weight,
    bias; DyT: alpha, weight, bias), and `sets` (x, dy) pairs; all but dy need gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (1 + 0.1 * torch.randn(cols, device=device, dtype=dtype, generator=gen)).requires_grad_()
    params = (weight,)
    if norm != "rmsnorm":
        params += ((0.1 * torch.randn(cols, device=device, dtype=dtype, generator=gen)).requires_grad_(),)
    if norm == "dyt":
        params = (torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True), *params)
    pairs = [(torch.randn(rows, cols, device=device, dtype=dtype, generator=gen).requires_grad_(),
              torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)) for _ in range(sets)]
    return params, pairs


def calls(f, mode, params, pairs) -> list:
    """One zero-argument call per input set doing `mode`."""
    def one(x, dy):
        leaves = [x, *params]
        if mode == "fwd":
            return lambda: f(x, *params)
        if mode == "fwd+bwd":
            return lambda: torch.autograd.grad(f(x, *params), leaves, dy)
        y = f(x, *params)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    return [one(x, dy) for x, dy in pairs]


def dispatch_us(fns: list, device: torch.device) -> float:
    """Host time per call of launching without a graph and without waiting for the GPU."""
    count = CALLS if device.type == "cuda" else 1  # CPU: interpreted kernels are slow and run synchronously
    sync(device)
    start = time.perf_counter()
    for i in range(count):
        fns[i % len(fns)]()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / count * 1e6


def gpu_us(fns: list) -> float:
    """GPU time per call: CALLS calls cycling through the input sets, captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    graph.replay()  # first replay uploads the graph
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return statistics.median(times)


def stream_us(fns: list) -> float:
    """GPU time per call of CALLS plain launches (the fallback when a graph cannot be captured): includes
    dispatch wherever dispatch is slower than the kernel."""
    for fn in fns:
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(CALLS):
        fns[i % len(fns)]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / CALLS


def wall_us(fns: list) -> float:
    """CPU: wall-clock time of one call (interpreted kernels: says nothing about speed)."""
    start = time.perf_counter()
    fns[0]()
    return (time.perf_counter() - start) * 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_gbps(device: torch.device, numel: int, sets: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written), timed like the norms."""
    pairs = [(torch.randn(numel, device=device), torch.empty(numel, device=device)) for _ in range(sets)]
    fns = [lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs]
    us = gpu_us(fns) if device.type == "cuda" else wall_us(fns)
    return 2 * pairs[0][0].nbytes / us / 1e3


def run_case(norm, impl_name, dtype, rows, cols, device, modes) -> list[dict]:
    """Times every mode of one implementation on one shape; errors become rows too."""
    sets = RING if device.type == "cuda" else 1
    params, pairs = inputs(norm, dtype, rows, cols, device, sets)
    x_bytes = pairs[0][0].nbytes
    out = []
    try:
        f = implementation(impl_name, norm, device)  # once per shape: torch.compile's cache serves every mode
    except Unavailable as error:
        f, unavailable = None, str(error)
    for mode in modes:
        row = dict(mode=mode)
        try:
            if f is None:
                raise Unavailable(unavailable)
            fns = calls(f, mode, params, pairs)
            fns[0]()  # compile (or load from the caches) outside every timing
            sync(device)
            row["dispatch_us"] = dispatch_us(fns, device)
            if device.type == "cpu":
                row["us"] = wall_us(fns)
            else:
                try:
                    row["us"] = gpu_us(fns)
                except RuntimeError as error:  # an implementation that cannot be captured in a CUDA graph
                    row["no_graph"] = (str(error).splitlines() or ["?"])[0][:200]
                    row["us"] = stream_us(fns)
            row["bytes"] = TENSORS_MOVED[mode] * x_bytes
            row["gbps"] = row["bytes"] / row["us"] / 1e3
        except Exception as error:  # noqa: BLE001 -- one failing implementation must not stop the run
            row["error"] = (str(error).splitlines() or [type(error).__name__])[0][:200]
        if impl_name == "triton" and mode != "fwd" and device.type == "cuda" and "error" not in row:
            from minilm.norms.triton_ops import backward_plan, dyt_backward_programs

            programs = dyt_backward_programs(rows, cols, device) if norm == "dyt" else \
                backward_plan(rows, cols, device).programs
            buffers = len(params) - (norm == "dyt")  # one [programs, N] fp32 partial per weight / bias
            row["partials_bytes"] = 2 * buffers * programs * cols * 4
        out.append(row)
    dtype_name = str(dtype).removeprefix("torch.")
    return [dict(norm=norm, impl=impl_name, dtype=dtype_name, rows=rows, cols=cols, **r) for r in out]


def warm_unit(norm: str, dtype_name: str, rows: int, cols: int, impls: list[str]) -> None:
    """Compile every implementation's forward and backward at one shape (fills the disk caches)."""
    device = torch.device("cuda")
    params, pairs = inputs(norm, getattr(torch, dtype_name), rows, cols, device, 1)
    for impl in impls:
        with contextlib.suppress(Exception):  # a failing implementation: the timing run reports it
            calls(implementation(impl, norm, device), "fwd+bwd", params, pairs)[0]()
    sync(device)


def warm_caches(grid, norms, impls, jobs: int) -> float:
    """Compile everything in `jobs` processes, each compiling alone (no Inductor worker pool)."""
    start = time.perf_counter()
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # inherited by the workers: jobs processes, not jobs x cores
    spawn = multiprocessing.get_context("spawn")
    units = [(norm, *shape) for shape in grid for norm in norms if timed(norm, shape[0])]
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
            list(pool.map(warm_unit, *zip(*units), [impls] * len(units)))
    except Exception as error:  # noqa: BLE001 -- e.g. a crashed worker: the timing run compiles what is missing
        print(f"warming the caches failed ({type(error).__name__}: {error}); compiling while timing", flush=True)
    del os.environ["TORCHINDUCTOR_COMPILE_THREADS"]
    return time.perf_counter() - start


# ------------------------------------------------------------------ goals and tables


def judge_goals(results: list[dict], copy: float) -> dict:
    """Each goal: status met / missed / not measured, the worst measured figure, the misses."""
    timed = {(r["norm"], r["mode"], r["dtype"], r["rows"], r["cols"], r["impl"]): r for r in results if "us" in r}
    ours = [k[:5] for k in timed if k[5] == "triton"]
    fraction = {k: timed[k + ("triton",)]["gbps"] / copy for k in ours}

    def goal(keys, value, ok, unit):
        misses = [dict(case=" ".join(map(str, k)), value=value(k)) for k in keys if not ok(value(k))]
        worst = min((value(k) for k in keys), default=None)
        status = "not measured" if not keys else "missed" if misses else "met"
        return dict(status=status, worst=worst, unit=unit, cases=len(keys), misses=misses)

    def speedup_over(k, impls):
        others = [timed[k + (i,)]["us"] for i in impls if k + (i,) in timed]
        return min(others) / timed[k + ("triton",)]["us"] if others else None

    bf16_large = [k for k in ours if k[2] == "bfloat16" and k[4] >= 1024]
    against = [k for k in ours if speedup_over(k, ("compile", "liger")) is not None]
    small = [k for k in ours if k[2] == "bfloat16" and k[4] <= 512 and k + ("eager",) in timed]
    return {
        "fwd_85": goal([k for k in bf16_large if k[1] == "fwd"], fraction.get, lambda v: v >= 0.85, "of copy"),
        "fwdbwd_70": goal([k for k in bf16_large if k[1] == "fwd+bwd"], fraction.get, lambda v: v >= 0.70, "of copy"),
        "small_2x_eager": goal(small, lambda k: speedup_over(k, ("eager",)), lambda v: v >= 2, "x eager"),
        "not_slower": goal(against, lambda k: speedup_over(k, ("compile", "liger")), lambda v: v >= 1,
                           "x best of compile / liger"),
    }


def figure(value: float, unit: str) -> str:
    return f"{100 * value:.0f}% {unit}" if unit == "of copy" else f"{value:.2f}{unit}"


def markdown(data: dict) -> str:
    """Tables per (norm, mode): GPU us per call and % of copy bandwidth per implementation; dispatch; goals."""
    results, copy, impls = data["results"], data["copy_gbps"], data["impls"]
    index = {(r["norm"], r["mode"], r["dtype"], r["rows"], r["cols"], r["impl"]): r for r in results}
    lines = [f"Copy bandwidth {copy:.0f} GB/s (measured in this run); {data['timer']}."]
    current = None
    for case in sorted({k[:5] for k in index}, key=lambda c: (c[0], MODES.index(c[1]), c[2], c[4])):
        if case[:2] != current:
            current = case[:2]
            lines += ["", f"#### {' '.join(current)}: us per call, % of copy bandwidth", "",
                      "| dtype | M | N | " + " | ".join(impls) + " | triton speedup vs best other |",
                      "|---" * (4 + len(impls)) + "|"]
        cells, us = [], {}
        for impl in impls:
            r = index.get(case + (impl,))
            if r is not None and "us" in r:
                us[impl] = r["us"]
            cells.append("" if r is None else "error" if "error" in r
                         else f"{r['us']:.1f} us {100 * r['gbps'] / copy:.0f}%" + ("*" if "no_graph" in r else ""))
        others = [t for i, t in us.items() if i != "triton"]
        speedup = f"{min(others) / us['triton']:.2f}x" if "triton" in us and others else ""
        lines.append(f"| {case[2]} | {case[3]} | {case[4]} | " + " | ".join(cells) + f" | {speedup} |")
    lines += ["", "#### Host dispatch per call (us, median over shapes; eager code pays this per call)", "",
              "| norm | mode | " + " | ".join(impls) + " |", "|---" * (2 + len(impls)) + "|"]
    for norm, mode in sorted({k[:2] for k in index}, key=lambda c: (c[0], MODES.index(c[1]))):
        cells = []
        for impl in impls:
            values = [r["dispatch_us"] for k, r in index.items() if k[:2] == (norm, mode) and k[5] == impl
                      and "dispatch_us" in r]
            cells.append(f"{statistics.median(values):.0f}" if values else "")
        lines.append(f"| {norm} | {mode} | " + " | ".join(cells) + " |")
    if any("no_graph" in r for r in results):
        lines += ["", "\\* timed without a CUDA graph (capture failed; dispatch included where it is slower "
                      "than the kernel): " + "; ".join(sorted({f"{r['impl']}: {r['no_graph']}" for r in results
                                                              if "no_graph" in r}))]
    errors = sorted({f"{r['impl']} {r['norm']} {r['mode']}: {r['error']}" for r in results if "error" in r})
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    lines += ["", "#### Goals", ""]
    if data.get("quick"):
        lines.append("Not judged: CPU dry run (interpreted kernels, wall-clock times).")
    for name, text in GOALS.items():
        if data.get("quick"):
            break
        g = data["goals"][name]
        line = f"- {text}: **{g['status']}**"
        if g["worst"] is not None:
            line += f" (worst {figure(g['worst'], g['unit'])} over {g['cases']} cases)"
        lines.append(line + "".join(f"\n  - {m['case']}: {figure(m['value'], g['unit'])}" for m in g["misses"]))
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        sys.exit("the grid needs a CUDA GPU; on CPU run with --quick (kernels through TRITON_INTERPRET=1)")
    import triton

    norms, impls, modes = args.norms.split(","), args.impls.split(","), args.modes.split(",")
    grid = shapes(args.quick)
    warm_s = warm_caches(grid, norms, impls, args.warm_jobs) if device.type == "cuda" and args.warm_jobs else 0.0
    copy_at_x = copy_gbps(device, (16 << 10) if args.quick else X_BYTES // 4, RING)
    copy_large = copy_gbps(device, (1 << 20) if args.quick else (1 << 30) // 4, 2)
    copy = max(copy_at_x, copy_large)
    try:
        liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger = None
    timer = (f"GPU time per call from CUDA-graph replay ({CALLS} calls over {RING} input sets, median of "
             f"{REPLAYS} replays); dispatch = host time per call without a graph") if device.type == "cuda" else \
        "CPU wall clock of interpreted kernels: not a speed measurement"
    data = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, liger_kernel=liger, quick=args.quick,
                timer=timer, eps=EPS, x_bytes=X_BYTES, copy_gbps=copy, copy_gbps_at_x=copy_at_x,
                copy_gbps_1gib=copy_large, warm_s=warm_s, impls=impls, results=[], goals={})
    print(f"{data['device']}: copy {copy_at_x:.0f} GB/s at x's size, {copy_large:.0f} GB/s at 1 GiB; "
          f"caches warmed in {warm_s:.0f} s; {timer}", flush=True)
    for dtype_name, rows, cols in grid:
        for norm in (n for n in norms if timed(n, dtype_name)):
            for impl in impls:
                start = time.perf_counter()
                new = run_case(norm, impl, getattr(torch, dtype_name), rows, cols, device, modes)
                data["results"] += new
                summary = ", ".join(f"{r['mode']} {r['us']:.1f}us ({100 * r['gbps'] / copy:.0f}%, "
                                    f"dispatch {r['dispatch_us']:.0f}us)" if "us" in r else f"{r['mode']} error: "
                                    f"{r['error']}" for r in new)
                print(f"{norm:9s} {impl:7s} {dtype_name:8s} {rows:6d}x{cols:<5d} {summary} "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        data["goals"] = {} if args.quick else judge_goals(data["results"], copy)  # CPU times are not judged
        if args.json:
            args.json.write_text(json.dumps(data, indent=1))
    print(markdown(data))
    ours_failed = sorted({f"{r['norm']} {r['mode']} {r['dtype']} N={r['cols']}: {r['error']}"
                          for r in data["results"] if r["impl"] == "triton" and "error" in r})
    goals = "not judged (CPU)" if args.quick else ", ".join(
        f"{name} {g['status']}" + (f" (worst {figure(g['worst'], g['unit'])})" if g["worst"] is not None else "")
        for name, g in data["goals"].items())
    print(f"{len(data['results'])} timings; our kernels failed in {len(ours_failed)}; goals: {goals}")
    sys.exit(1 if ours_failed else 0)


if __name__ == "__main__":
    main()
