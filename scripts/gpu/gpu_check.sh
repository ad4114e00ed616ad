#!/usr/bin/env bash
# The GPU check: prove every Triton kernel and measure the headline figures in three parts, each one
# command of at most 10 minutes on one GPU (parts 1 and 2 together fit 15 minutes, start-up included).
#
#   bash scripts/gpu/gpu_check.sh --fetch     # on a CPU machine with the package registry: the wheels the
#                                         # device image lacks -> .whl/ (the run must carry: [".whl"])
#   bash scripts/gpu/gpu_check.sh 1           # on the GPU: correctness, norm bandwidth, precision paths
#   bash scripts/gpu/gpu_check.sh 2           # on the GPU, right after part 1: training throughput
#   bash scripts/gpu/gpu_check.sh 3           # on the GPU, in a window of its own: sweep throughput, CUDA graphs
#   bash scripts/gpu/gpu_check.sh --dry-run   # anywhere, no GPU: every section at toy sizes (CI runs it)
#
# Part N writes into $OUT/partN/ ($OUT: where the results go; ./gpu-results without it),
# at most 8 files: each section's log and JSON are written by the section itself as it runs (no
# pipeline in between), so a section killed at its cap keeps what it wrote. partN/check.log holds
# this script's own lines: one PASS / FAIL / SKIP line per section, then a SUMMARY line. The exit
# status is 0 only when every section passed; optional sections (marked so) may SKIP without
# failing the part, but not FAIL. Then `python3 scripts/gpu/gpu_results.py DIR` turns the results into
# benchmarks/h200/<date>/.
#
# Time budget. Part 1 ends within 330 s and part 2 within 240 s of their start: with 1-3 minutes of
# machine start-up both fit one 15-minute window. Each section has a cap (seconds) and never runs past
# its part's deadline; a section with under 10 s left is skipped. Caps are estimates made without a
# GPU (no GPU figure has been measured yet): Triton compiles are about 1 s per kernel
# specialization, Inductor 40-90 s for GPT-2 small, a few seconds for one norm.
#   part 1: setup ~15 s (install, import check) | correctness 90 (~40 kernel specializations per
#           dtype for LayerNorm and RMSNorm, fewer for DyT's one path; 9 processes, one per norm and
#           dtype) | GPU-marked tests 35 (kernels cached by then) | bandwidth 100 (25 shapes x 4
#           implementations compiled in 10 processes, then 200 CUDA-graph timings; DyT in bf16 only)
#           | precision 60 (data preparation ~10 s, then 2 x 200 steps of model=small, eager)
#           | optional, with what is left: Triton tests on the GPU, compute-sanitizer memcheck
#   part 2: setup ~15 s | compiled, torch LayerNorm, diagnostics on vs off: 110 (~60 s compilation,
#           3 x 110 steps, 2 end-of-run checkpoints of 1.5 GB) | compiled, Triton LayerNorm: 80 | eager,
#           torch LayerNorm in bf16 and in fp8 (tensorwise): 25 each (55 steps). All four fit when
#           compilation takes under ~60 s; otherwise the last ones are cut short or skipped. Optional, with
#           what is left: model=modern optim=muon compiled, 55 steps. bench_train.py rewrites its JSON
#           after every measurement, so a configuration stopped at its cap keeps what it measured.
set -uo pipefail
OUT_ROOT=$(realpath -m "${OUT:-$(dirname "$0")/../../gpu-results}")  # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/../.."
ROOT=$PWD
WHEELS=${WHEEL_DIR:-.whl}  # WHEEL_DIR: another folder (the tests use it)
PY=${PYTHON:-python3}      # the device image's python3 holds torch; PYTHON: another interpreter
SITE=/tmp/minilm-site
MODE=${1:-}
DRY_RUN_CAP_FACTOR=3  # the dry run's caps: interpreted kernels on a shared CPU; its parts' deadlines still bound them

fetch() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    local pins
    pins=$("$PY" scripts/gpu/gpu_setup.py pins) || exit 1
    for pin in $pins; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$pin" 2>/dev/null \
            || "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHEELS" "$pin" \
            || { echo "fetch FAILED: no wheel of $pin for CPython 3.12 on x86-64 Linux, and no pure-Python sdist"; exit 1; }
    done  # the fallback builds sdist-only packages here (antlr4-python3-runtime): pure Python, so any wheel fits
    "$PY" scripts/gpu/gpu_setup.py verify "$WHEELS"
}

say() { echo "$*" | tee -a "$CHECK_LOG"; }

# record STATUS NAME SECONDS TEXT
record() {
    say "$1 $2 ($3 s): $4"
    case $1 in
        PASS) PASSED=$((PASSED + 1)) ;;
        SKIP) if [ "$OPTIONAL" = 1 ]; then OPTIONAL_SKIPPED=$((OPTIONAL_SKIPPED + 1)); else SKIPPED=$((SKIPPED + 1)); fi ;;
        *) FAILED=$((FAILED + 1)) ;;
    esac
}

# section NAME CAP LOG COMMAND...: COMMAND with at most CAP seconds (DRY_RUN_CAP_FACTOR times that in a
# dry run; fewer if the part's deadline is nearer), stdout and stderr appended straight to LOG. Exit 0 is PASS, 3 is SKIP (the section's last
# line says why), anything else FAIL; killed at the cap: FAIL (SKIP for an optional section).
section() {
    local name=$1 cap=$2 log=$3
    shift 3
    ((DRY_RUN == 1)) && cap=$((cap * DRY_RUN_CAP_FACTOR))  # a slow or busy CI machine is not a failure
    local left=$((DEADLINE - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        record SKIP "$name" 0 "no time left before the part's ${PART_S} s deadline"
        return
    fi
    echo "== $name: $* (cap ${cap} s)" >>"$log"
    local start=$SECONDS rc=0 last status
    timeout -k 5 "$cap" "$@" >>"$log" 2>&1 || rc=$?
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-240)
    case $rc in
        0) record PASS "$name" $((SECONDS - start)) "$last" ;;
        3) record SKIP "$name" $((SECONDS - start)) "$last" ;;
        124 | 137) if [ "$OPTIONAL" = 1 ]; then status=SKIP; else status=FAIL; fi
            record $status "$name" $((SECONDS - start)) "stopped at its ${cap} s cap; partial output in $(basename "$log")" ;;
        *) record FAIL "$name" $((SECONDS - start)) "exit $rc: $last" ;;
    esac
}

optional() {
    OPTIONAL=1
    section "$@"
    OPTIONAL=0
}

# Wheels, install, import check, environment record. Any failure stops the part with one line.
setup() {
    local start=$SECONDS
    if [ "$DRY_RUN" = 1 ]; then
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
            say "setup FAILED: no wheels in $WHEELS/: run 'bash scripts/gpu/gpu_check.sh --fetch' on a machine" \
                "with the package registry and carry .whl (carry: [\".whl\"])"
            exit 2
        fi
        local verified
        verified=$("$PY" scripts/gpu/gpu_setup.py verify "$WHEELS" 2>>"$CHECK_LOG") || { say "setup FAILED: $verified"; exit 2; }
        echo "$verified" >>"$CHECK_LOG"
        rm -rf "$SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >>"$CHECK_LOG" 2>&1 \
            || { say "setup FAILED: pip could not install the carried wheels (its output is in check.log)"; exit 2; }
        export PYTHONPATH="$SITE:$ROOT"
    fi
    local checked rc=0 installed=()
    [ "$DRY_RUN" = 1 ] || installed=(--site "$SITE" --require-cuda)
    checked=$("$PY" scripts/gpu/gpu_setup.py check-install "${installed[@]}" --environment "$PART_DIR/environment.json" \
        2>>"$CHECK_LOG") || rc=$?
    echo "$checked" >>"$CHECK_LOG"
    ((rc == 0)) || { say "$(grep -m1 'setup FAILED' <<<"$checked" || echo "setup FAILED: the import check crashed (see check.log)")"; exit 2; }
    echo "$title"
    record PASS setup $((SECONDS - start)) "$(tail -n 1 <<<"$checked")"
}

part1() {
    local dry=() jobs=()
    [ "$DRY_RUN" = 1 ] && dry=(--dry-run) jobs=(--jobs 2)
    section correctness 90 "$PART_DIR/correctness.log" \
        "$PY" scripts/gpu/gpu_correctness.py "${dry[@]}" "${jobs[@]}" --json "$PART_DIR/correctness.json"
    if [ "$DRY_RUN" = 1 ]; then  # no CUDA: the GPU-marked tests are only collected
        section "collect-only gpu-marked tests" 35 "$PART_DIR/correctness.log" \
            "$PY" -m pytest -qq -p no:cacheprovider --collect-only -m gpu tests
    else
        section "gpu-marked tests" 35 "$PART_DIR/correctness.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
    fi
    if [ "$DRY_RUN" = 1 ]; then
        section bandwidth 100 "$PART_DIR/bench_norms.log" \
            "$PY" scripts/bench/bench_norms.py --quick --modes fwd,fwd+bwd --json "$PART_DIR/bench_norms.json"
    else
        section bandwidth 100 "$PART_DIR/bench_norms.log" \
            "$PY" scripts/bench/bench_norms.py --warm-jobs 10 --modes fwd,fwd+bwd --json "$PART_DIR/bench_norms.json"
    fi
    section precision 60 "$PART_DIR/precision.log" \
        "$PY" scripts/gpu/gpu_precision.py "${dry[@]}" --json "$PART_DIR/precision.json"
    if [ "$DRY_RUN" = 0 ]; then  # CI runs these on CPU already; here they run on the GPU if time is left
        local xdist=()
        "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
        optional "Triton tests on the GPU (optional)" 60 "$PART_DIR/correctness.log" \
            "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -m "not gpu" tests/test_triton_norms.py
    fi
    optional "compute-sanitizer memcheck (optional)" 45 "$PART_DIR/correctness.log" \
        "$PY" scripts/gpu/gpu_correctness.py --sanitize
}

# One bench_train configuration: NAME CAP ARGS... (overrides and flags of bench_train.py).
train_config() {
    local name=$1 cap=$2 file=${1% (optional)}
    shift 2
    # model=small's shape as keys, so a configuration may choose its own model preset (model=modern)
    local size=(model.n_layer=12 model.n_head=12 model.d_model=768 model.block_size=1024 precision=bf16)
    [ "$DRY_RUN" = 1 ] && size=(model.n_layer=2 model.d_model=32 model.n_head=2 model.block_size=32
        train.batch_size=4 train.eval_batches=1 data.max_files=40 data.vocab_size=512 train.compile_backend=aot_eager)
    section "training: $name" "$cap" "$PART_DIR/train.log" \
        "$PY" scripts/bench/bench_train.py "${size[@]}" "$@" --json "$PART_DIR/train_${file// /_}.json"
}

part2() {
    local long=(--warmup 10 --steps 100 --repeats 1) short=(--warmup 5 --steps 50 --repeats 1)
    # --warmup 10 --steps 100 times steps 11-110: diagnostics sample step 100 (default interval).
    [ "$DRY_RUN" = 1 ] && long=(--warmup 1 --steps 2 --repeats 1) short=(--warmup 1 --steps 2 --repeats 1)
    train_config "compile layernorm" 110 train.compile=true norm=layernorm "${long[@]}" --diagnostics-cost
    train_config "compile triton_layernorm" 80 train.compile=true norm=triton_layernorm "${long[@]}"
    train_config "eager layernorm" 25 norm=layernorm "${short[@]}"
    train_config "eager fp8" 25 norm=layernorm precision=fp8 "${short[@]}"  # against eager bf16 just above
    # With what is left: today's recipe at the same shape, compiled (tokens/s and MFU against compile
    # layernorm above; bench_train records its graph breaks and recompiles). One JSON: part 2 writes 8 files.
    OPTIONAL=1
    train_config "compile modern muon (optional)" 90 model=modern optim=muon train.compile=true "${short[@]}"
    OPTIONAL=0
}

# Part 3: sweep throughput (minilm/train/ensemble.py) and CUDA graphs for a small model (train.compile_mode).
# Caps: the lr_qknorm study at size=tiny, 14 runs of 30 steps, in turn then as 2 batched ensembles: 80 s
# (in turn ~14 x 3 s of start-up, evaluation and sample per run); the step behind it (bench_ensemble.py: a
# step alone, of an ensemble of 7, of one run at 7x the batch): 30 s; model=tiny compiled with inductor's default
# mode, then with reduce-overhead (CUDA graphs): 40 s each (~20 s compilation, 100 steps); optional, with what
# is left: 3 runs of lr_qknorm's grid at model=small, in turn then as one ensemble. The part ends within 420 s:
# run it in a window of its own (with start-up, parts 1 and 2 leave too little of one window).
# sweep_config NAME FILE CAP ARGS...: bench_sweep.py ARGS, its JSON in $PART_DIR/sweep_FILE.json
sweep_config() {
    local name=$1 file=$2 cap=$3
    shift 3
    section "sweep: $name" "$cap" "$PART_DIR/bench.log" \
        "$PY" scripts/bench/bench_sweep.py "$@" --json "$PART_DIR/sweep_$file.json"
}

part3() {
    local tiny=(size=tiny) steps=(--steps 30) small=(model=small) small_steps=(--steps 10) rounds=20 grid=()
    local train=(model=tiny --warmup 10 --steps 100 --repeats 1)
    if [ "$DRY_RUN" = 1 ]; then  # toy sizes; CUDA graphs need CUDA: the dry run times the default mode twice
        tiny=(size=test) steps=(--steps 2) small=(size=test) small_steps=(--steps 2) rounds=2
        grid=(optim.lr=1e-3,1e-2)  # 4 of the study's 14 runs: still 2 ensembles, a quarter of the time
        train=(model=tiny model.n_layer=1 model.d_model=32 model.n_head=2 model.block_size=32 train.batch_size=4
            train.eval_batches=1 data.max_files=40 data.vocab_size=512 train.compile_backend=aot_eager
            --warmup 1 --steps 2 --repeats 1)
    fi
    sweep_config "lr_qknorm tiny" tiny 80 experiment=lr_qknorm "${tiny[@]}" "${grid[@]}" "${steps[@]}"
    section "step: 7 runs alone, as an ensemble, folded" 30 "$PART_DIR/bench.log" "$PY" scripts/bench/bench_ensemble.py \
        "${tiny[@]}" diagnostics=off --members 7 --rounds "$rounds" --json "$PART_DIR/step_tiny.json"
    local graphs=train.compile_mode=reduce-overhead
    [ "$DRY_RUN" = 1 ] && graphs=train.compile_mode=default
    section "training: tiny compiled" 40 "$PART_DIR/bench.log" \
        "$PY" scripts/bench/bench_train.py train.compile=true "${train[@]}" --json "$PART_DIR/train_tiny_compiled.json"
    section "training: tiny CUDA graphs" 40 "$PART_DIR/bench.log" "$PY" scripts/bench/bench_train.py train.compile=true \
        "$graphs" "${train[@]}" --json "$PART_DIR/train_tiny_cuda_graphs.json"
    OPTIONAL=1
    sweep_config "lr_qknorm small, 3 runs (optional)" small 200 experiment=lr_qknorm "${small[@]}" \
        "${small_steps[@]}" optim.lr=1e-4,1e-3,1e-2 model.qk_norm=true
    OPTIONAL=0
}

run_part() {
    PART=$1 PART_S=$2
    PART_DIR="$OUT_ROOT/part$PART"
    rm -rf "$PART_DIR" && mkdir -p "$PART_DIR"
    CHECK_LOG="$PART_DIR/check.log"
    PASSED=0 FAILED=0 SKIPPED=0 OPTIONAL_SKIPPED=0 OPTIONAL=0
    SECONDS=0
    DEADLINE=$((PART_S - 5))  # the summary's margin
    local title
    title="GPU check part $PART: deadline ${PART_S} s, results in $PART_DIR"
    [ "$DRY_RUN" = 1 ] && title+=" (DRY RUN on CPU: toy sizes, interpreted Triton, no GPU figures)"
    echo "$title" >"$CHECK_LOG"
    setup  # prints the title once it passed; a failing setup prints its one line and exits
    "part$PART"
    say "SUMMARY part $PART: $PASSED passed, $FAILED failed, $SKIPPED skipped, $OPTIONAL_SKIPPED optional skipped, in $SECONDS s"
    ((FAILED + SKIPPED == 0))
}

export PYTHONUNBUFFERED=1 MINILM_CACHE=${MINILM_CACHE:-/tmp/minilm-cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    WANDB_MODE=offline
case "$MODE" in
    --fetch) fetch ;;
    1) DRY_RUN=0; run_part 1 330 ;;
    2) DRY_RUN=0; run_part 2 240 ;;
    3) DRY_RUN=0; run_part 3 420 ;;
    --dry-run)
        # CPU only, kernels through Triton's interpreter; generous deadlines (a slow CI machine is not a
        # failure). The parts run side by side, since most sections use one core and start-up (imports)
        # is most of their time; part 2 has its own token cache (two processes must not build one
        # cache at once) and its lines are printed after part 1's.
        export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
        DRY_RUN=1
        part2_lines=$(mktemp)
        # Part 3 follows part 2 in the same background job (one token cache).
        (MINILM_CACHE="$MINILM_CACHE/dry-run-part2" run_part 2 600; echo "rc2=$?"
         MINILM_CACHE="$MINILM_CACHE/dry-run-part2" run_part 3 600; echo "rc3=$?") >"$part2_lines" 2>&1 &
        part2=$!
        run_part 1 600
        first=$?
        wait $part2
        second=$(sed -n 's/^rc2=//p' "$part2_lines") third=$(sed -n 's/^rc3=//p' "$part2_lines")
        grep -v '^rc[23]=' "$part2_lines" && rm -f "$part2_lines"
        echo "SUMMARY dry run: part 1 $([ $first = 0 ] && echo passed || echo FAILED)," \
            "part 2 $([ "$second" = 0 ] && echo passed || echo FAILED)," \
            "part 3 $([ "$third" = 0 ] && echo passed || echo FAILED)"
        ((first + second + third == 0)) ;;
    *) echo "usage: bash scripts/gpu/gpu_check.sh --fetch | 1 | 2 | 3 | --dry-run  (see the comment at its top)"; exit 2 ;;
esac
