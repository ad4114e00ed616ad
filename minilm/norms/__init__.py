"""The one norm registry: every normalization layer the model uses is built here, and every fact about
a kind is asked of it (NORMS), never read off the kind's name.

All kinds work on the last dimension, return the input dtype and compute in fp32
(torch's kernels upcast internally; our Triton kernels do it themselves because custom
ops bypass autocast). `dyt` (minilm/norms/dyt.py) keeps no statistics: it squashes each
element with a learned tanh instead of normalizing the row.

A new kind is a row of NORMS (and a value of config.NormKind, which tests/test_model.py holds equal).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def _layernorm(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)


def _rmsnorm(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)


def _triton_layernorm(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    from minilm.norms.triton_norm import TritonLayerNorm  # imports triton

    return TritonLayerNorm(dim, eps=eps, affine=affine, bias=bias and affine)


def _triton_rmsnorm(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    from minilm.norms.triton_norm import TritonRMSNorm  # imports triton

    return TritonRMSNorm(dim, eps=eps, affine=affine)


def _dyt(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    from minilm.norms.dyt import DyT

    return DyT(dim, dyt_alpha, affine=affine, bias=bias and affine)


def _triton_dyt(dim: int, eps: float, affine: bool, bias: bool, dyt_alpha: float) -> nn.Module:
    from minilm.norms.triton_norm import TritonDyT  # imports triton

    return TritonDyT(dim, dyt_alpha, affine=affine, bias=bias and affine)


@dataclass(frozen=True)
class NormKindSpec:
    build: Callable[[int, float, bool, bool, float], nn.Module]  # (dim, eps, affine, bias, dyt_alpha) -> the module
    triton: bool  # our Triton kernel (a custom op): needs CUDA or the interpreter, and has no vmap rule
    twin: str     # the torch kind that computes the same function


NORMS = {
    "layernorm": NormKindSpec(_layernorm, triton=False, twin="layernorm"),
    "rmsnorm": NormKindSpec(_rmsnorm, triton=False, twin="rmsnorm"),
    "dyt": NormKindSpec(_dyt, triton=False, twin="dyt"),
    "triton_layernorm": NormKindSpec(_triton_layernorm, triton=True, twin="layernorm"),
    "triton_rmsnorm": NormKindSpec(_triton_rmsnorm, triton=True, twin="rmsnorm"),
    "triton_dyt": NormKindSpec(_triton_dyt, triton=True, twin="dyt"),
}
NORM_KINDS = tuple(NORMS)


def norm_spec(kind: str) -> NormKindSpec:
    """The registry's facts about `kind`; an unknown kind names the choices."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
    return NORMS[kind]


def norm_unavailable_reason(kind: str, device_type: str) -> str | None:
    """Why norm `kind` cannot run on `device_type` (one line, with the fix), or None if it can."""
    from minilm.norms.availability import triton_unavailable_reason  # probes triton on first ask

    return triton_unavailable_reason(device_type) if norm_spec(kind).triton else None


def build_norm(kind: str, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True,
               dyt_alpha: float = 0.5) -> nn.Module:
    """A norm over the last dim of size `dim`. `bias` applies to the LayerNorm and DyT kinds, `eps` to
    all but DyT, `dyt_alpha` (alpha's initial value) to DyT only."""
    return norm_spec(kind).build(dim, eps, affine, bias, dyt_alpha)


def float64_norm(norm: str, x, eps: float):
    """The textbook two-pass formula (x_hat, rstd) of a `layernorm` or `rmsnorm`; run in float64 it is the
    truth the Triton kernels and the diagnostics' norm probe are compared to."""
    centred = x if norm == "rmsnorm" else x - x.mean(-1, keepdim=True)
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    return centred * rstd, rstd
