"""Float64 truth and tolerances for the Triton norms, shared by tests/test_triton_norms.py and the
GPU check's kernel sweep (scripts/gpu/gpu_correctness.py), so both hold the kernels to one standard.

`norm` here is "layernorm", "rmsnorm" or "dyt" (the torch kinds the Triton ones replace). DyT's
alpha is the learnable scalar DYT_ALPHA, in the parameters' dtype, and its gradient the fifth output.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1 before triton is imported);
with CUDA everything here runs on the GPU.
"""

import math

import torch
import torch.nn.functional as F

from minilm.norms import float64_norm, triton_ops
from minilm.norms.dyt import dyt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMS = ("layernorm", "rmsnorm", "dyt")
DYT_ALPHA = 0.7  # neither the paper's 0.5 nor 1: a power of two would make alpha * x exact
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Allowed error as a fraction of the magnitude each result's error scales with (see `reference`).
# - fp16 / bf16: rounding the output dominates. Half an ulp is 2^-11 (fp16) / 2^-8 (bf16); we allow
#   one ulp because Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest).
# - fp32: a few fp32 sums over a row, error ~ sqrt(N) * 2^-24; 1e-5 (~80 ulps) bounds it for N <= 5120.
# - fp64 (the gradcheck dtype): only eps, which Triton passes as an fp32 scalar, differs.
TOL = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-5, torch.float64: 1e-10}
# "At least as accurate as torch" allows this much on top of torch's own error: one output ulp for
# 16-bit dtypes (ties, the interpreter's truncation), a few ulps for fp32 (summation order).
SLACK = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 4 * 2**-23}
OUTPUTS = ("y", "dx", "dweight", "dbias", "dalpha")


def make_params(norm, n, affine, dtype, gen):
    """(weight, bias): affine is 'fp32' / 'input' (parameter dtype), 'no_bias' (fp32) or 'none'."""
    if affine == "none":
        return None, None
    param_dtype = dtype if affine == "input" else torch.float32
    weight = (1 + 0.5 * torch.randn(n, generator=gen)).to(DEVICE, param_dtype)
    if norm == "rmsnorm" or affine == "no_bias":
        return weight, None
    return weight, (0.5 * torch.randn(n, generator=gen)).to(DEVICE, param_dtype)


def random_inputs(norm, dtype, shape, affine, seed=0):
    """(x, dy, weight, bias) with an offset mean, drawn on the CPU so every device sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=gen) + 0.5).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return x, dy, *make_params(norm, shape[-1], affine, dtype, gen)


def dyt_alpha(norm, x, weight):
    """DyT's alpha (DYT_ALPHA in the parameters' dtype: fp32 without a weight), None for the other norms."""
    if norm != "dyt":
        return None
    return torch.full((1,), DYT_ALPHA, dtype=torch.float32 if weight is None else weight.dtype, device=x.device)


def triton_norm(norm, x, weight, bias, alpha, eps):
    if norm == "dyt":
        return triton_ops.dyt(x, alpha, weight, bias)
    return triton_ops.rms_norm(x, weight, eps) if norm == "rmsnorm" else triton_ops.layer_norm(x, weight, bias, eps)


def torch_norm(norm, x, weight, bias, alpha, eps):
    shape = (x.shape[-1],)
    if norm == "dyt":
        return dyt(x, alpha, weight, bias)
    return F.rms_norm(x, shape, weight, eps) if norm == "rmsnorm" else F.layer_norm(x, shape, weight, bias, eps)


def forward_backward(fn, norm, x, weight, bias, eps, dy):
    """(y, dx, dweight, dbias, dalpha) of fn, None for absent parameters."""
    params = (x, weight, bias, dyt_alpha(norm, x, weight))
    leaves = [None if t is None else t.detach().requires_grad_() for t in params]
    y = fn(norm, *leaves, eps)
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))
    return (y.detach(), *[None if t is None else next(grads) for t in leaves])


def reference(norm, x, weight, bias, eps, dy):
    """float64 truth of (y, dx, dweight, dbias, dalpha) for the same (already rounded) inputs, and the
    magnitudes their rounding errors scale with: |x_hat * w| + |b| for y; rstd * |dy * w| for dx,
    a difference of such terms; the row sums of |dy * x_hat| and |dy| for dweight and dbias. For DyT,
    x_hat is tanh(alpha * x), dx is dy * w * alpha * sech^2(alpha * x) elementwise and dalpha the sum
    of every |dy * w * x * sech^2(alpha * x)|."""

    def affine(norm, x, weight, bias, alpha, eps):
        if norm == "dyt":
            return dyt(x, alpha, weight, bias)
        y = float64_norm(norm, x, eps)[0]
        return y * (1.0 if weight is None else weight) + (0.0 if bias is None else bias)

    x64, w64, b64, dy64 = (None if t is None else t.double() for t in (x, weight, bias, dy))
    truth = forward_backward(affine, norm, x64, w64, b64, eps, dy64)
    w_abs = 1.0 if w64 is None else w64.abs()
    if norm == "dyt":
        alpha = dyt_alpha(norm, x, weight).double()
        x_hat = torch.tanh(alpha * x64)
        g_sech2 = dy64.abs() * w_abs * (1 - x_hat.square())
        dx_scale, dalpha_scale = (alpha * g_sech2).max(), (g_sech2 * x64.abs()).sum()
    else:
        x_hat, rstd = float64_norm(norm, x64, eps)
        dx_scale, dalpha_scale = (rstd * dy64.abs() * w_abs).max(), None
    scales = (
        (x_hat.abs() * w_abs + (0.0 if b64 is None else b64.abs())).max(),
        dx_scale,
        (dy64 * x_hat).abs().reshape(-1, x.shape[-1]).sum(0).max(),
        dy64.abs().reshape(-1, x.shape[-1]).sum(0).max(),
        dalpha_scale,
    )
    return truth, scales


def relative_error(actual, expected, scale):
    """max |actual - expected| / scale (a zero scale demands exact zeros); inf when actual has inf/NaN."""
    diff = float((actual.double() - expected).abs().max())
    if diff == 0:
        return 0.0
    err = diff / float(scale) if scale > 0 else math.inf
    return err if math.isfinite(err) else math.inf


def triton_errors(norm, x, dy, weight, bias, eps, ours=None):
    """{output name: relative error} of the Triton norm's (y, dx, dweight, dbias, dalpha) -- `ours` if given,
    else computed here -- against the float64 truth; absent parameters are left out. Asserts that
    every output has its input's dtype and shape."""
    ours = ours or forward_backward(triton_norm, norm, x, weight, bias, eps, dy)
    truth, scales = reference(norm, x, weight, bias, eps, dy)
    errors = {}
    likes = (x, x, weight, bias, dyt_alpha(norm, x, weight))
    for name, actual, expected, scale, like in zip(OUTPUTS, ours, truth, scales, likes):
        assert (actual is None) == (expected is None), name
        if actual is not None:
            assert actual.dtype == like.dtype and actual.shape == like.shape, name
            errors[name] = relative_error(actual, expected, scale)
    return errors
