"""The one norm registry: every normalization layer the model uses is built here.

All kinds normalize the last dimension, return the input dtype and compute their
statistics in fp32 (torch's kernels upcast internally; our Triton kernels do it
themselves because custom ops bypass autocast).
"""

from torch import nn

from minilm.config import NormKind

NORM_KINDS = tuple(kind.value for kind in NormKind)


def build_norm(kind: str, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True) -> nn.Module:
    """A norm over the last dim of size `dim`. `bias` only applies to LayerNorm kinds."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "triton_layernorm":
        from minilm.norms.triton_norm import TritonLayerNorm

        return TritonLayerNorm(dim, eps=eps, affine=affine, bias=bias and affine)
    if kind == "triton_rmsnorm":
        from minilm.norms.triton_norm import TritonRMSNorm

        return TritonRMSNorm(dim, eps=eps, affine=affine)
    raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def float64_norm(norm: str, x, eps: float):
    """The textbook two-pass formula (x_hat, rstd) of a `layernorm` or `rmsnorm`; run in float64 it is the
    truth the Triton kernels and the diagnostics' norm probe are compared to."""
    centred = x if norm == "rmsnorm" else x - x.mean(-1, keepdim=True)
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    return centred * rstd, rstd

