"""RMSNorm (every norm in Hymba): normalise in fp32, round to the activation dtype, then
multiply by the weight (hymba-architecture.md §3.2); and the mixer's average of its attention
and SSM outputs' norms, ``(rmsnorm(a) + rmsnorm(y)) / 2`` in the activation dtype (§3.3)."""

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


def rmsnorm_avg_ref(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor, eps: float) -> torch.Tensor:
    """a, b [..., D], wa, wb [D] -> (rmsnorm(a, wa) + rmsnorm(b, wb)) / 2 in a.dtype."""
    return (rmsnorm_ref(a, wa, eps) + rmsnorm_ref(b, wb, eps)) / 2


def rmsnorm_avg(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor, eps: float) -> torch.Tensor:
    if backend.use_fast(a):
        from ._rmsnorm_triton import rmsnorm_avg_triton
        return rmsnorm_avg_triton(a, wa, b, wb, eps)
    return rmsnorm_avg_ref(a, wa, b, wb, eps)
