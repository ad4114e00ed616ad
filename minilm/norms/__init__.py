"""The one norm registry: every normalization layer the model uses is built here.

All kinds work on the last dimension, return the input dtype and compute in fp32
(torch's kernels upcast internally; our Triton kernels do it themselves because custom
ops bypass autocast). `dyt` (minilm/norms/dyt.py) keeps no statistics: it squashes each
element with a learned tanh instead of normalizing the row.
"""

from torch import nn

from minilm.config import NormKind

NORM_KINDS = tuple(kind.value for kind in NormKind)


def build_norm(kind: str, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True,
               dyt_alpha: float = 0.5) -> nn.Module:
    """A norm over the last dim of size `dim`. `bias` applies to the LayerNorm and DyT kinds, `eps` to
    all but DyT, `dyt_alpha` (alpha's initial value) to DyT only."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "dyt":
        from minilm.norms.dyt import DyT

        return DyT(dim, dyt_alpha, affine=affine, bias=bias and affine)
    if kind == "triton_layernorm":
        from minilm.norms.triton_norm import TritonLayerNorm

        return TritonLayerNorm(dim, eps=eps, affine=affine, bias=bias and affine)
    if kind == "triton_rmsnorm":
        from minilm.norms.triton_norm import TritonRMSNorm

        return TritonRMSNorm(dim, eps=eps, affine=affine)
    if kind == "triton_dyt":
        from minilm.norms.triton_norm import TritonDyT

        return TritonDyT(dim, dyt_alpha, affine=affine, bias=bias and affine)
    raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def float64_norm(norm: str, x, eps: float):
    """The textbook two-pass formula (x_hat, rstd) of a `layernorm` or `rmsnorm`; run in float64 it is the
    truth the Triton kernels and the diagnostics' norm probe are compared to."""
    centred = x if norm == "rmsnorm" else x - x.mean(-1, keepdim=True)
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    return centred * rstd, rstd

