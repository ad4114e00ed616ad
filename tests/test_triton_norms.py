"""Triton LayerNorm / RMSNorm / DyT: float64 truth, hard inputs, determinism, torch integration.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; with CUDA the same tests run on the GPU.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minilm.norms import availability, build_norm, triton_kernels, triton_ops
from minilm.norms.availability import triton_unavailable_reason
from minilm.norms.dyt import DyT
from minilm.norms.reference import (
    DEVICE,
    DTYPES,
    NORMS,
    OUTPUTS,
    SLACK,
    TOL,
    dyt_alpha,
    forward_backward,
    make_params,
    random_inputs,
    reference,
    relative_error,
    torch_norm,
    triton_errors,
    triton_norm,
)
from minilm.norms.triton_norm import TritonDyT, TritonLayerNorm, TritonRMSNorm


def check_against_reference(norm, dtype, shape, eps, affine, seed=0):
    x, dy, weight, bias = random_inputs(norm, dtype, shape, affine, seed)
    for name, err in triton_errors(norm, x, dy, weight, bias, eps).items():
        assert err <= TOL[dtype], f"{name}: error {err:.2e} > {TOL[dtype]:.2e}"


# ----------------------------------------------------------------------------------------------
# Correctness on ordinary inputs
# ----------------------------------------------------------------------------------------------

SHAPES = [((4, 1), 1e-5), ((2, 3, 3), 1e-5), ((7, 123), 1e-6), ((3, 1000), 1e-5), ((2, 5120), 1e-5)]
NORM_AFFINE = [(norm, affine) for norm in NORMS for affine in ("fp32", "input", "none", "no_bias")
               if (norm, affine) != ("rmsnorm", "no_bias")]


def quick_if(quick: bool) -> list:
    """The marks of a case that `pytest -m "not slow"` runs only if `quick` (the interpreter pays per program)."""
    return [] if quick else [pytest.mark.slow]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


# The quick tier: every norm, affine and dtype at one shape, and every shape once per norm (fp32).
@pytest.mark.parametrize("norm,affine,dtype,shape,eps", [
    pytest.param(norm, affine, dtype, shape, eps, id=f"{norm}-{affine}-{dtype}-{shape_id(shape)}-{eps}",
                 marks=quick_if(shape == (7, 123) or (dtype == torch.float32 and affine == "fp32")))
    for norm, affine in NORM_AFFINE for dtype in DTYPES for shape, eps in SHAPES])
def test_matches_float64_reference(norm, affine, dtype, shape, eps):
    check_against_reference(norm, dtype, shape, eps, affine)


class _NotOnThisPath:
    def __getitem__(self, grid):
        raise AssertionError("a fused kernel was launched where the looped path was expected")


@pytest.fixture
def looped(monkeypatch):
    """Rows longer than one block at test-sized N: fused limit 8, 8-wide chunks (DyT's column chunks
    too), fused kernels banned. (The interpreter pays per chunk and row, so these tests keep both few.)"""
    monkeypatch.setattr(triton_ops, "FORWARD", dataclasses.replace(triton_ops.FORWARD, max_fused_n=8))
    monkeypatch.setattr(triton_ops, "BACKWARD", dataclasses.replace(triton_ops.BACKWARD, max_fused_n=8))
    monkeypatch.setattr(triton_ops, "LOOP_BLOCK_N", 8)
    monkeypatch.setattr(triton_kernels, "norm_fwd_fused_kernel", _NotOnThisPath())
    monkeypatch.setattr(triton_kernels, "norm_bwd_fused_kernel", _NotOnThisPath())


@pytest.fixture(params=("fused", "looped"))
def path(request):
    """Run a test on both kernel paths."""
    if request.param == "looped":
        request.getfixturevalue("looped")
    return request.param


# The quick tier: every norm and affine in fp32, and every norm in bf16, at the 2-D shape.
@pytest.mark.parametrize("norm,affine,dtype,shape", [
    pytest.param(norm, affine, dtype, shape, id=f"{norm}-{affine}-{dtype}-{shape_id(shape)}",
                 marks=quick_if(shape == (3, 9) and (dtype == torch.float32 or affine == "fp32")))
    for norm, affine in NORM_AFFINE if affine != "input" for dtype in (torch.float32, torch.bfloat16)
    for shape in [(3, 9), (2, 2, 29)]])
def test_looped_path_matches_float64_reference(looped, norm, affine, dtype, shape):
    check_against_reference(norm, dtype, shape, 1e-5, affine)


@pytest.mark.parametrize("norm,dtype", [
    pytest.param("layernorm", torch.float32, marks=pytest.mark.slow),
    pytest.param("rmsnorm", torch.bfloat16, marks=pytest.mark.slow),
    ("dyt", torch.float32)], ids=str)
def test_rows_longer_than_64k(monkeypatch, norm, dtype):
    monkeypatch.setattr(triton_kernels, "norm_fwd_fused_kernel", _NotOnThisPath())
    monkeypatch.setattr(triton_kernels, "norm_bwd_fused_kernel", _NotOnThisPath())
    check_against_reference(norm, dtype, (2, 70_001), 1e-5, "fp32")


# The full Jacobian of the fused path costs the interpreter thousands of launches: slow; the float64
# reference tests check the fused gradients in the quick tier.
@pytest.mark.parametrize("path", [pytest.param("fused", marks=pytest.mark.slow), "looped"], indirect=True)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm, path):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
                       for shape in ((2, 13), (13,), (13,)))
    fast = path == "looped"  # a random projection of the Jacobian: the interpreted looped path is slow
    bias = None if norm == "rmsnorm" else bias
    alpha = dyt_alpha(norm, x, weight)
    alpha = None if alpha is None else alpha.requires_grad_()
    params = [t for t in (weight, bias, alpha) if t is not None]

    def fn(x, *given):
        given = iter(given)
        weight_, bias_, alpha_ = (None if t is None else next(given) for t in (weight, bias, alpha))
        return triton_norm(norm, x, weight_, bias_, alpha_, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=fast)


LAYOUTS = {
    "row_stride": lambda t: torch.cat([t, t], -1)[..., : t.shape[-1]],  # rows further apart than N: strides
    "permuted": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # leading dims not mergeable: a copy
    "column_stride": lambda t: torch.stack([t, t], -1)[..., 0],  # last-dim stride 2: a copy
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_inputs_match_contiguous(norm, layout):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(3, 4, 37, generator=gen).to(DEVICE) for _ in range(2))
    weight, bias = make_params(norm, 37, "fp32", torch.float32, gen)
    strided_x, strided_dy = LAYOUTS[layout](x), LAYOUTS[layout](dy)
    assert not strided_x.is_contiguous() and torch.equal(strided_x, x)
    expected = forward_backward(triton_norm, norm, x, weight, bias, 1e-5, dy)
    actual = forward_backward(triton_norm, norm, strided_x, weight, bias, 1e-5, strided_dy)
    assert all(a is e is None or torch.equal(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch(norm):
    x, dy = (torch.randn(0, 3, 16, device=DEVICE) for _ in range(2))
    weight, bias = make_params(norm, 16, "fp32", torch.float32, torch.Generator().manual_seed(0))
    y, dx, dweight, dbias, dalpha = forward_backward(triton_norm, norm, x, weight, bias, 1e-5, dy)
    assert y.shape == dx.shape == x.shape
    assert torch.equal(dweight, torch.zeros_like(weight))
    assert bias is None or torch.equal(dbias, torch.zeros_like(bias))
    assert (dalpha is None) == (norm != "dyt") and (dalpha is None or torch.equal(dalpha, torch.zeros(1)))


def test_broadcast_output_gradient():
    """dy with row stride 0 (e.g. the gradient of a sum over rows) is read by stride."""
    x = torch.randn(5, 24, device=DEVICE)
    weight = torch.randn(24, device=DEVICE)
    dy = torch.randn(24, device=DEVICE).expand(5, 24)
    expected = forward_backward(triton_norm, "rmsnorm", x, weight, None, 1e-5, dy.contiguous())
    actual = forward_backward(triton_norm, "rmsnorm", x, weight, None, 1e-5, dy)
    assert all(a is e is None or torch.equal(a, e) for a, e in zip(actual, expected))


# ----------------------------------------------------------------------------------------------
# Numerically hard inputs: float64 truth of the same rounded input, and no worse than torch
# ----------------------------------------------------------------------------------------------

NEAR_ONE = [[1.00001, 1.00002, 1.00003, 1.00004, 1.00005]]
HARD = {
    # the fp32 mean of 1e8 + {0, 8, 16, ...} is not representable (ulp 8): torch's CPU LayerNorm is off
    "offset_1e8_fp32": (lambda g: 1e8 + 8 * torch.randint(0, 64, (4, 48), generator=g).float(), 1e-5),
    "near_one_fp32": (lambda g: torch.tensor(NEAR_ONE), 1e-5),  # variance 2e-10: E[x^2] - E[x]^2 would be 0
    "near_one_fp16": (lambda g: torch.tensor(NEAR_ONE).half(), 1e-5),  # rounds to a constant row
    "huge_bf16": (lambda g: (1e30 * torch.randn(4, 48, generator=g)).bfloat16(), 1e-5),  # squares overflow fp32
    "huge_fp32": (lambda g: 1e30 * torch.randn(4, 48, generator=g), 1e-5),
    "near_max_fp32": (lambda g: 1e38 * torch.randn(4, 48, generator=g).clamp(-3, 3), 1e-5),  # x - x[0] overflows
    "tiny_fp32": (lambda g: 1e-30 * torch.randn(4, 48, generator=g), 1e-5),  # eps dominates
    "tiny_fp32_eps0": (lambda g: 1e-30 * torch.randn(4, 48, generator=g), 0.0),  # squares underflow to 0
    "tiny_bf16_eps0": (lambda g: (1e-25 * torch.randn(4, 48, generator=g)).bfloat16(), 0.0),
    "constant_fp32": (lambda g: torch.full((4, 48), 3.0), 1e-5),  # variance exactly 0
    "outlier_first_fp32": (lambda g: torch.cat([torch.full((4, 1), 1e4), torch.randn(4, 47, generator=g)], 1), 1e-5),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", HARD)
@pytest.mark.parametrize("norm", NORMS)
def test_hard_inputs(norm, case):
    gen = torch.Generator().manual_seed(0)
    make_x, eps = HARD[case]
    x = make_x(gen).to(DEVICE)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype)
    weight, bias = make_params(norm, x.shape[-1], "input", x.dtype, gen)  # torch needs parameters in x.dtype
    ours = forward_backward(triton_norm, norm, x, weight, bias, eps, dy)
    theirs = forward_backward(torch_norm, norm, x, weight, bias, eps, dy)
    truth, scales = reference(norm, x, weight, bias, eps, dy)
    for name, actual, torch_result, expected, scale in zip(OUTPUTS, ours, theirs, truth, scales):
        if expected is None:
            continue
        err, torch_err = relative_error(actual, expected, scale), relative_error(torch_result, expected, scale)
        assert err <= TOL[x.dtype], f"{name}: error {err:.2e} (torch {torch_err:.2e})"
        assert err <= torch_err + SLACK[x.dtype], f"{name}: error {err:.2e} > torch's {torch_err:.2e}"


@pytest.mark.parametrize("scale", [1e-3, 1e-30])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_dyt_is_accurate_near_zero(scale, dtype):
    """Without a bias every error is relative to max |tanh(alpha x)| ~ alpha |x|: where 1 - exp(-2|u|)
    cancels (|u| < 0.25 takes the series), and where the series' higher terms underflow."""
    gen = torch.Generator().manual_seed(0)
    x = (scale * torch.randn(4, 48, generator=gen)).to(DEVICE, dtype)
    dy = torch.randn(4, 48, generator=gen).to(DEVICE, dtype)
    for name, err in triton_errors("dyt", x, dy, None, None, 0.0).items():
        assert err <= TOL[dtype], f"{name}: error {err:.2e} > {TOL[dtype]:.2e}"


@pytest.mark.parametrize("norm,path", [
    pytest.param(norm, path, marks=quick_if(path == "fused" or norm == "dyt"))
    for path in ("fused", "looped") for norm in NORMS], indirect=["path"])
def test_bitwise_deterministic(norm, path):
    gen = torch.Generator().manual_seed(0)
    rows, n = (6, 19) if path == "looped" else (96, 100)  # several programs per launch either way
    x, dy = (torch.randn(rows, n, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    weight, bias = make_params(norm, n, "fp32", torch.bfloat16, gen)
    first = forward_backward(triton_norm, norm, x, weight, bias, 1e-5, dy)
    for _ in range(2):
        again = forward_backward(triton_norm, norm, x, weight, bias, 1e-5, dy)
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(again, first))


# ----------------------------------------------------------------------------------------------
# torch integration: custom ops, torch.compile, modules, registry, errors, training
# ----------------------------------------------------------------------------------------------


def _opcheck_args(name):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(2, 3, 40, generator=gen).to(DEVICE) for _ in range(2))
    weight, bias = make_params("layernorm", 40, "fp32", torch.float32, gen)
    leaf = x.clone().requires_grad_()
    if name == "layer_norm":
        return triton_ops.layer_norm_op, (leaf, weight.requires_grad_(), bias, 1e-5)
    if name == "layer_norm_no_affine":
        return triton_ops.layer_norm_op, (leaf, None, None, 1e-5)
    if name == "rms_norm_bf16":
        return triton_ops.rms_norm_op, (leaf.detach().bfloat16().requires_grad_(), weight, 1e-6)
    if name == "layer_norm_backward":
        _, mean, rstd, scale = triton_ops.layer_norm_op(x, weight, bias, 1e-5)
        return triton_ops.layer_norm_backward_op, (dy, x, weight, mean, rstd, scale, True)
    alpha = torch.full((1,), 0.7, device=DEVICE)
    if name == "dyt":
        return triton_ops.dyt_op, (leaf, alpha.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    if name == "dyt_bf16_no_affine":
        return triton_ops.dyt_op, (leaf.detach().bfloat16().requires_grad_(), alpha.requires_grad_(), None, None)
    if name == "dyt_backward":
        return triton_ops.dyt_backward_op, (dy, x, alpha, weight, False)
    _, rstd, scale = triton_ops.rms_norm_op(x, None, 1e-5)
    return triton_ops.rms_norm_backward_op, (dy, x, None, rstd, scale)


@pytest.mark.parametrize("name", ["layer_norm", "layer_norm_no_affine", "rms_norm_bf16", "layer_norm_backward",
                                  "rms_norm_backward", "dyt", "dyt_bf16_no_affine", "dyt_backward"])
def test_opcheck(name):
    op, args = _opcheck_args(name)
    torch.library.opcheck(op, args)


def test_model_compiles_fullgraph():
    # On CPU, aot_eager still traces the fake implementations and the autograd formulas;
    # inductor would need a C++ toolchain and minutes of compilation.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), TritonLayerNorm(32), nn.GELU(), nn.Linear(32, 24), TritonRMSNorm(24),
                          TritonDyT(24, 0.7))
    model = model.to(DEVICE)
    x = torch.randn(4, 7, 16, device=DEVICE)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fails on any graph break
    actual = compiled(x)
    grads = torch.autograd.grad(actual.square().sum(), list(model.parameters()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,affine,bias", [("layernorm", True, True), ("layernorm", True, False),
                                              ("layernorm", False, False), ("rmsnorm", True, False),
                                              ("rmsnorm", False, False), ("dyt", True, True), ("dyt", True, False),
                                              ("dyt", False, False)])
def test_modules_are_drop_in_for_torch(norm, affine, bias):
    if norm == "dyt":
        ours, theirs = TritonDyT(24, 0.7, affine=affine, bias=bias), DyT(24, 0.7, affine=affine, bias=bias)
    elif norm == "rmsnorm":
        ours, theirs = TritonRMSNorm(24, eps=1e-6, affine=affine), nn.RMSNorm(24, eps=1e-6, elementwise_affine=affine)
    else:
        ours = TritonLayerNorm(24, eps=1e-6, affine=affine, bias=bias)
        theirs = nn.LayerNorm(24, eps=1e-6, elementwise_affine=affine, bias=bias)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))  # same init
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    x = torch.randn(2, 5, 24, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=TOL[torch.float32], atol=TOL[torch.float32])
    theirs.load_state_dict(ours.state_dict())


def test_registry_builds_triton_modules():
    layer_norm = build_norm("triton_layernorm", 16, 1e-6, True, False)
    assert isinstance(layer_norm, TritonLayerNorm) and layer_norm.eps == 1e-6 and layer_norm.bias is None
    rms_norm = build_norm("triton_rmsnorm", 16, 1e-6, False)
    assert isinstance(rms_norm, TritonRMSNorm) and rms_norm.weight is None
    dyt = build_norm("triton_dyt", 16, affine=True, bias=False, dyt_alpha=0.25)
    assert isinstance(dyt, TritonDyT) and dyt.bias is None and dyt.weight.shape == (16,)
    assert torch.equal(dyt.alpha.detach(), torch.tensor([0.25]))


def test_unavailable_reason_says_what_to_do(monkeypatch):
    assert triton_unavailable_reason(DEVICE) is None  # this process runs them (GPU or interpreter)
    assert "norm=layernorm / norm=rmsnorm" in triton_unavailable_reason("mps")
    monkeypatch.setattr(availability, "triton_interpreted", lambda: False)  # as without TRITON_INTERPRET=1
    assert triton_unavailable_reason("cpu").startswith("Triton norms need a CUDA GPU; on CPU set TRITON_INTERPRET=1")


@pytest.mark.slow  # a fresh interpreter that imports torch and triton; the message is checked above in-process
def test_cpu_without_interpreter_fails_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from minilm.norms.triton_norm import TritonRMSNorm; "
            "from minilm.norms.availability import triton_unavailable_reason; "
            "print(triton_unavailable_reason('cpu')); TritonRMSNorm(8)(torch.randn(2, 8))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "set TRITON_INTERPRET=1" in proc.stdout
    assert "RuntimeError: Triton norms need a CUDA GPU; on CPU set TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.slow  # 10 interpreted steps per norm; the kernels themselves are checked above
@pytest.mark.parametrize("norm", NORMS)
def test_training_tracks_torch_norm(norm, tmp_path):
    # Both runs are fp32 and differ only in rounding (a few ulps per norm output, summation order).
    # Measured on CPU: the losses of these 10 steps agree to 1e-6 (two fp32 ulps at 6.0), while
    # scaling one term of LayerNorm's dx by 0.9 moves them by up to 7.6e-4. 5e-5 sits between,
    # with headroom for GPU reduction orders. No warmup, so every step really learns.
    from tests.helpers import losses, run_training

    short = ["train.max_steps=10", "train.batch_size=2", "optim.warmup_steps=0"]  # the interpreter pays per program
    expected = losses(run_training([f"norm={norm}", *short], tmp_path / "torch"))
    actual = losses(run_training([f"norm=triton_{norm}", *short], tmp_path / "triton"))
    assert len(actual) == len(expected) == 10
    assert max(abs(a - e) for a, e in zip(actual, expected)) < 5e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 4096, 8192, 20_000])
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_training_sized_rows(norm, n):
    check_against_reference(norm, torch.bfloat16, (4096, n), 1e-5, "fp32")
