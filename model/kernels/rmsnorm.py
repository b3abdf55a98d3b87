"""RMSNorm (every norm in Hymba): normalise in fp32, round to the activation dtype, then
multiply by the weight (hymba-architecture.md §3.2)."""

from __future__ import annotations

import torch

from . import backend


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x.dtype."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if backend.use_fast(x):
        from ._rmsnorm_triton import rmsnorm_triton
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_ref(x, weight, eps)
