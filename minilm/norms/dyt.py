"""Dynamic Tanh (DyT, Zhu et al. 2025): gamma * tanh(alpha * x) + beta, a normalization-free
replacement for LayerNorm with one learnable scalar alpha per layer.

DyT keeps no statistics: it is elementwise, apart from the gradients of alpha, gamma and beta,
which are sums over the rows (and, for alpha, over every element). `norm=triton_dyt` is the
fused Triton twin (`TritonDyT`, the same parameters and state dict).
"""

import torch
from torch import Tensor, nn


def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """gamma * tanh(alpha * x) + beta over the last dim, computed in fp32 (fp64 for fp64 inputs,
    which makes it the float64 truth), returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.tanh(alpha.to(compute) * x.to(compute))
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


class DyT(nn.Module):
    """DyT over the last dim of size `dim`: alpha (shape (1,), from `alpha_init`), and with `affine`
    the gain `weight` (ones) and, with `bias`, `bias` (zeros), as LayerNorm's."""

    def __init__(self, dim: int, alpha_init: float = 0.5, affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.normalized_shape = (dim,)
        self.elementwise_affine = affine
        self.alpha = nn.Parameter(torch.full((1,), alpha_init, **factory))
        self.weight = nn.Parameter(torch.ones(dim, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim, **factory)) if affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        return dyt(x, self.alpha, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
