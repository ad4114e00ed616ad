"""nn.Modules over our Triton kernels: drop-in replacements for nn.LayerNorm / nn.RMSNorm / DyT.

Same parameter names, shapes and initialization as torch's, so state dicts load either
way. Importing this file never needs triton: without it (or without a CUDA GPU and the
interpreter) `minilm.norms.availability` says why and what to do, and forward raises it.
"""

import torch
from torch import nn

from minilm.norms.availability import triton_unavailable_reason
from minilm.norms.dyt import DyT

try:
    from minilm.norms import triton_ops
except ImportError:  # triton missing or broken: triton_unavailable_reason says why
    triton_ops = None


def _unavailable(x: torch.Tensor) -> RuntimeError:
    return RuntimeError(triton_unavailable_reason(x.device.type) or "Triton norms are unavailable")


class TritonLayerNorm(nn.Module):
    """LayerNorm over the last dim of size `dim` with our Triton kernels (see triton_kernels.py)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (dim,)
        self.eps = eps
        self.elementwise_affine = affine
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(dim, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim, **factory)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops is None:
            raise _unavailable(x)
        return triton_ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class TritonRMSNorm(nn.Module):
    """RMSNorm over the last dim of size `dim` with our Triton kernels (see triton_kernels.py)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (dim,)
        self.eps = eps
        self.elementwise_affine = affine
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops is None:
            raise _unavailable(x)
        return triton_ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class TritonDyT(DyT):
    """DyT (minilm/norms/dyt.py) with our fused Triton kernels: the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops is None:
            raise _unavailable(x)
        return triton_ops.dyt(x, self.alpha, self.weight, self.bias)
