#!/usr/bin/env bash
# Everything a GPU machine has to prove, in one call: install, every test (GPU-marked ones
# included), the norm-kernel benchmark and the training benchmarks. Raw output goes to $OUT
# (the device tool's result folder) or ./gpu-results.
#
#   bash scripts/gpu_check.sh --fetch   # here, with internet to the package registry: download
#                                       # the wheels the GPU image lacks into .whl/
#   bash scripts/gpu_check.sh           # there: install .whl/, test, benchmark
#
# The GPU image has torch and triton but not hydra-core, omegaconf, datasets or wandb.
# Not yet run on a GPU: no session so far had one lent.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pure-Python wheels the GPU image lacks (versions as installed by pyproject here; wandb is left
# out: W&B runs offline through logger=none there, and its tests run on CPU in CI).
WHEELS="hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5"

if [ "${1:-}" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for wheel in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$wheel" \
            || echo "could not fetch $wheel"
    done
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # published as sdist only
    exit 0
fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT/layernorm" "$OUT/rmsnorm"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 MINILM_CACHE=/tmp/minilm-cache WANDB_MODE=offline

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/device.txt"
python3 -m pytest -q tests/test_triton_norms.py tests/test_train.py tests/test_config.py tests/test_scale.py 2>&1 | tail -40 | tee "$OUT/pytest.txt"
for norm in layernorm rmsnorm; do  # the full grid is ~800 timings: one norm per pass
    python3 scripts/bench_norms.py --norms "$norm" --out "$OUT/$norm" 2>&1 | tail -60 > "$OUT/$norm/log.txt"
done
python3 scripts/bench_train.py model=small precision=bf16 train.compile=true --steps 50 \
    logger=none --json "$OUT/bench_train_small_bf16_compile.json" 2>&1 | tail -20 | tee "$OUT/bench_train.txt"
python3 scripts/bench_train.py model=small precision=bf16 train.compile=true norm=triton_rmsnorm logger=none --steps 50 \
    --json "$OUT/bench_train_small_bf16_compile_triton_rmsnorm.json" 2>&1 | tail -20 | tee -a "$OUT/bench_train.txt"
