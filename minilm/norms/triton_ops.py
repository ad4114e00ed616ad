"""Launchers and torch custom ops for the Triton norms; public `layer_norm` / `rms_norm` / `dyt`.

Layers: `triton_kernels` (jit code) -> this file (shapes, launch configs, custom ops
`minilm::layer_norm`, `minilm::rms_norm`, `minilm::dyt` and their backward ops, each with a fake
implementation for torch.compile, and the autograd formulas) -> `triton_norm` (modules).

Numerics contract: output in the input dtype; statistics and weight-gradient sums in
fp32 (fp64 for fp64 inputs); no atomics anywhere, so repeated calls on the same device
give bitwise-identical results. Launch configs are fixed heuristics, not autotuned:
autotuning picks by timing, so two processes could pick different reduction orders.
"""

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from minilm.norms import triton_kernels as kernels
from minilm.norms.availability import triton_interpreted, triton_unavailable_reason

INTERPRETED = triton_interpreted()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch heuristics of one direction. Fixed, not autotuned: autotuning picks by timing,
    so two processes could pick different reduction orders and lose bitwise reproducibility."""

    tile_elems: int  # elements per program: short rows are packed several to a program
    elems_per_thread: int  # sets num_warps (4..32)
    max_fused_n: int  # longer rows take the looped path


# Chosen from ptxas register counts for sm_90 (Triton 3.6 and 3.9; no GPU was at hand to time
# them): the tiles that keep the most loads in flight per SM. Backward holds about twice the live
# values per element (x, dy, x_hat, g, two weight-gradient accumulators), so it gets half the
# elements per thread; nothing spills below the fused limits (longer rows would, on sm_90).
FORWARD = Tiling(tile_elems=2048, elems_per_thread=16, max_fused_n=16384)
BACKWARD = Tiling(tile_elems=1024, elems_per_thread=8, max_fused_n=8192)
LOOP_BLOCK_N = 4096  # chunk width of the looped path
LOOP_NUM_WARPS = 8
WARPS_PER_SM = 16  # persistent backward programs per SM: 16 // num_warps, about what stays resident

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}
_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


def _fused_config(tiling: Tiling, M: int, N: int, device: torch.device) -> tuple[int, int, int]:
    """(rows per program, BLOCK_N, num_warps) of a fused kernel."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, tiling.tile_elems // block_n)
    while block_m > 1 and triton.cdiv(M, block_m) < 2 * _num_sms(device):  # small batches: fill every SM
        block_m //= 2
    num_warps = min(32, max(4, block_m * block_n // (32 * tiling.elems_per_thread)))
    return block_m, block_n, num_warps


def _as_rows(t: Tensor) -> Tensor:
    """t as an (M, N) matrix with unit column stride: a view when the layout allows, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _check(x: Tensor, *params: Tensor | None) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(triton_unavailable_reason(x.device.type))
    if x.dtype not in _ACC:
        raise TypeError(f"Triton norms take fp16, bf16, fp32 or fp64 inputs, not {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"Triton norms need a non-empty last dim, got shape {tuple(x.shape)}")
    for p in params:
        if p is not None and (tuple(p.shape) != (x.shape[-1],) or p.device != x.device):
            raise ValueError(f"weight/bias must have shape ({x.shape[-1]},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")


def _check_alpha(x: Tensor, alpha: Tensor) -> None:
    if tuple(alpha.shape) != (1,) or alpha.device != x.device:
        raise ValueError(f"DyT's alpha must have shape (1,) on {x.device}, got {tuple(alpha.shape)} on {alpha.device}")


def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool):
    """(y, mean or None, rstd, scale): see triton_kernels for what the statistics mean."""
    _check(x, weight, bias)
    x2 = _as_rows(x)
    M, N = x2.shape
    acc = _ACC[x.dtype]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = None if rms else torch.empty(M, dtype=acc, device=x.device)
    rstd, scale = (torch.empty(M, dtype=acc, device=x.device) for _ in range(2))
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    flags = dict(IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=_TL[acc])
    args = (x2, y, weight, bias, mean, rstd, scale, x2.stride(0), y.stride(0))
    with _on_device(x):
        if M > 0 and FORWARD.max_fused_n >= N:
            block_m, block_n, num_warps = _fused_config(FORWARD, M, N, x.device)
            kernels.norm_fwd_fused_kernel[(triton.cdiv(M, block_m),)](
                *args, M, N, float(eps), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
        elif M > 0:
            kernels.norm_fwd_looped_kernel[(M,)](
                *args, N, float(eps), BLOCK_N=LOOP_BLOCK_N, num_warps=LOOP_NUM_WARPS, **flags)
    lead = x.shape[:-1]
    return y.view(x.shape), None if rms else mean.view(lead), rstd.view(lead), scale.view(lead)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    looped: bool
    programs: int  # rows of the [programs, N] fp32 partial weight gradients
    block_m: int
    block_n: int
    num_warps: int


def backward_plan(M: int, N: int, device: torch.device) -> BackwardPlan:
    """How the backward of an (M, N) input is launched (the benchmark reports its partials' bytes)."""
    if BACKWARD.max_fused_n >= N:
        block_m, block_n, num_warps = _fused_config(BACKWARD, M, N, device)
        # persistent programs, a few per SM, each summing its own tiles' weight gradients
        programs = min(triton.cdiv(M, block_m), _num_sms(device) * max(1, WARPS_PER_SM // num_warps))
        return BackwardPlan(False, programs, block_m, block_n, num_warps)
    # grid (programs, column chunks): about four programs per SM in all
    programs = min(M, triton.cdiv(4 * _num_sms(device), triton.cdiv(N, LOOP_BLOCK_N)))
    return BackwardPlan(True, programs, 1, LOOP_BLOCK_N, LOOP_NUM_WARPS)


def _partials(programs: int, N: int, acc: torch.dtype, device: torch.device, weight: Tensor | None,
              has_bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """The [programs, N] partial dweight / dbias a backward kernel writes, None for an absent parameter."""
    return tuple(torch.empty((programs, N), dtype=acc, device=device) if wanted else None
                 for wanted in (weight is not None, has_bias))


def _summed(partials: tuple[Tensor | None, ...], acc: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The partials' column sums: fixed-shape reductions, so deterministic (zeros for 0 programs);
    empty tensors stand for "no such parameter"."""
    return tuple(torch.empty(0, dtype=acc, device=device) if p is None else p.sum(0) for p in partials)


def _backward_buffers(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    """x and dy as (M, N) rows, an empty (M, N) dx, and the compute dtype."""
    x2 = _as_rows(x)
    return x2, _as_rows(dy), torch.empty(x2.shape, dtype=x.dtype, device=x.device), _ACC[x.dtype]


def _backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor | None, rstd: Tensor, scale: Tensor,
              has_bias: bool, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); the weight gradients in the statistics dtype, empty when absent."""
    _check(x, weight)
    x2, dy2, dx, acc = _backward_buffers(dy, x)
    M, N = x2.shape
    if M == 0:
        return dx.view(x.shape), *_summed(_partials(0, N, acc, x.device, weight, has_bias), acc, x.device)
    weight = None if weight is None else weight.contiguous()
    mean, rstd, scale = (None if t is None else t.reshape(-1).contiguous() for t in (mean, rstd, scale))
    plan = backward_plan(M, N, x.device)
    dw_part, db_part = _partials(plan.programs, N, acc, x.device, weight, has_bias)
    flags = dict(IS_RMS=rms, HAS_WEIGHT=weight is not None, ACC=_TL[acc], BLOCK_N=plan.block_n,
                 num_warps=plan.num_warps)
    strides = (x2.stride(0), dy2.stride(0))
    with _on_device(x):
        if not plan.looped:
            kernels.norm_bwd_fused_kernel[(plan.programs,)](
                x2, dy2, dx, weight, mean, rstd, scale, dw_part, db_part, *strides, dx.stride(0), M, N,
                HAS_BIAS=has_bias, BLOCK_M=plan.block_m, **flags)
        else:
            mean_g, mean_gx = (torch.empty(M, dtype=acc, device=x.device) for _ in range(2))
            kernels.norm_bwd_coeffs_looped_kernel[(M,)](
                x2, dy2, weight, mean, rstd, scale, mean_g, mean_gx, *strides, N, **flags)
            kernels.norm_bwd_looped_kernel[(plan.programs, triton.cdiv(N, plan.block_n))](
                x2, dy2, dx, weight, mean, rstd, scale, mean_g, mean_gx, dw_part, db_part, *strides, dx.stride(0),
                M, N, HAS_BIAS=has_bias, **flags)
    return dx.view(x.shape), *_summed((dw_part, db_part), acc, x.device)


def dyt_config(tiling: Tiling, M: int, N: int, device: torch.device) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_N, column chunks, num_warps) of a DyT kernel: rows longer than
    LOOP_BLOCK_N are cut into chunks of that width, short ones packed as the fused norms pack them."""
    block_m, block_n, num_warps = _fused_config(tiling, M, min(N, LOOP_BLOCK_N), device)
    return block_m, block_n, triton.cdiv(N, block_n), num_warps


def _dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    _check(x, weight, bias)
    _check_alpha(x, alpha)
    x2 = _as_rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if M > 0:
        block_m, block_n, chunks, num_warps = dyt_config(FORWARD, M, N, x.device)
        with _on_device(x):
            kernels.dyt_fwd_kernel[(triton.cdiv(M, block_m), chunks)](
                x2, y, alpha, weight, bias, x2.stride(0), y.stride(0), M, N,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, ACC=_TL[_ACC[x.dtype]], num_warps=num_warps)
    return y.view(x.shape)


def dyt_backward_programs(M: int, N: int, device: torch.device) -> int:
    """Rows of the DyT backward's [programs, N] partial weight gradients: a few programs per SM in all."""
    block_m, _, chunks, num_warps = dyt_config(BACKWARD, M, N, device)
    per_chunk = triton.cdiv(_num_sms(device) * max(1, WARPS_PER_SM // num_warps), chunks)
    return max(1, min(triton.cdiv(M, block_m), per_chunk))


def _dyt_backward(dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, has_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha of shape (1,), dweight, dbias); the parameter gradients in the compute dtype,
    dweight / dbias empty when absent."""
    _check(x, weight)
    _check_alpha(x, alpha)
    x2, dy2, dx, acc = _backward_buffers(dy, x)
    M, N = x2.shape
    if M == 0:
        dw, db = _summed(_partials(0, N, acc, x.device, weight, has_bias), acc, x.device)
        return dx.view(x.shape), torch.zeros(1, dtype=acc, device=x.device), dw, db
    weight = None if weight is None else weight.contiguous()
    block_m, block_n, chunks, num_warps = dyt_config(BACKWARD, M, N, x.device)
    programs = dyt_backward_programs(M, N, x.device)
    dw_part, db_part = _partials(programs, N, acc, x.device, weight, has_bias)
    dalpha_part = torch.empty((programs, chunks), dtype=acc, device=x.device)
    with _on_device(x):
        kernels.dyt_bwd_kernel[(programs, chunks)](
            x2, dy2, dx, alpha, weight, dw_part, db_part, dalpha_part, x2.stride(0), dy2.stride(0), dx.stride(0),
            M, N, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n,
            ACC=_TL[acc], num_warps=num_warps)
    return dx.view(x.shape), dalpha_part.sum().reshape(1), *_summed((dw_part, db_part), acc, x.device)


# ------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, which uses the fake implementations to trace them)
# ------------------------------------------------------------------------------------------


def _fake_stats(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=_ACC[x.dtype])


def _fake_param_grad(x: Tensor, present: bool) -> Tensor:
    return x.new_empty(x.shape[-1] if present else 0, dtype=_ACC[x.dtype])


@torch.library.custom_op("minilm::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, scale)."""
    return _forward(x, weight, bias, eps, rms=False)


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_stats(x), _fake_stats(x), _fake_stats(x)


@torch.library.custom_op("minilm::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, scale)."""
    y, _, rstd, scale = _forward(x, weight, None, eps, rms=True)
    return y, rstd, scale


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_stats(x), _fake_stats(x)


@torch.library.custom_op("minilm::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, scale: Tensor,
                           has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight / dbias are empty when the parameter is absent."""
    return _backward(dy, x, weight, mean, rstd, scale, has_bias, rms=False)


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, scale, has_bias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, _fake_param_grad(x, weight is not None), _fake_param_grad(x, has_bias)


@torch.library.custom_op("minilm::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, scale: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """(dx, dweight); dweight is empty when there is no weight."""
    dx, dw, _ = _backward(dy, x, weight, None, rstd, scale, False, rms=True)
    return dx, dw


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_param_grad(x, weight is not None)


@torch.library.custom_op("minilm::dyt", mutates_args=())
def dyt_op(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return _dyt_forward(x, alpha, weight, bias)


@dyt_op.register_fake
def _(x, alpha, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("minilm::dyt_backward", mutates_args=())
def dyt_backward_op(dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, has_bias: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias); dweight / dbias are empty when the parameter is absent."""
    return _dyt_backward(dy, x, alpha, weight, has_bias)


@dyt_backward_op.register_fake
def _(dy, x, alpha, weight, has_bias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dalpha = x.new_empty(1, dtype=_ACC[x.dtype])
    return dx, dalpha, _fake_param_grad(x, weight is not None), _fake_param_grad(x, has_bias)


def _param_grad(grad: Tensor, param: Tensor | None) -> Tensor | None:
    return None if param is None else grad.to(param.dtype)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd, scale = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, scale)
    ctx.mark_non_differentiable(mean, rstd, scale)


def _layer_norm_grad(ctx, dy, *_):
    x, weight, bias, mean, rstd, scale = ctx.saved_tensors
    dx, dw, db = layer_norm_backward_op(dy, x, weight, mean, rstd, scale, bias is not None)
    return dx, _param_grad(dw, weight), _param_grad(db, bias), None


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd, scale = output
    ctx.save_for_backward(x, weight, rstd, scale)
    ctx.mark_non_differentiable(rstd, scale)


def _rms_norm_grad(ctx, dy, *_):
    x, weight, rstd, scale = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, x, weight, rstd, scale)
    return dx, _param_grad(dw, weight), None


def _dyt_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dyt_grad(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    dx, dalpha, dw, db = dyt_backward_op(dy, x, alpha, weight, bias is not None)
    return dx, dalpha.to(alpha.dtype), _param_grad(dw, weight), _param_grad(db, bias)


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)
rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
dyt_op.register_autograd(_dyt_grad, setup_context=_dyt_setup)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (like F.layer_norm); weight/bias fp32 or x.dtype; returns x.dtype."""
    return layer_norm_op(x, weight, bias, eps)[0]


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim (like F.rms_norm); weight fp32 or x.dtype; returns x.dtype."""
    return rms_norm_op(x, weight, eps)[0]


def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """DyT over the last dim (like minilm.norms.dyt.dyt); alpha of shape (1,), parameters fp32 or
    x.dtype; computes in fp32 (fp64 for fp64 inputs), returns x.dtype."""
    return dyt_op(x, alpha, weight, bias)
