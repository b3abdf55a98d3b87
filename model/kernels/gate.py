"""The MLP's gate: ``SiLU(g) ⊙ u`` with SiLU's output rounded to the activation dtype before the
product, and the product rounded (hymba-architecture.md §3.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u [..., I] -> SiLU(g) * u in g.dtype."""
    return F.silu(g) * u


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if backend.use_fast(g):
        from ._gate_triton import silu_mul_triton
        return silu_mul_triton(g, u)
    return silu_mul_ref(g, u)
