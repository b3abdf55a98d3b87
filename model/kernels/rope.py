"""Rotary position embedding, rotate-half convention (pairs ``i`` and ``i + d/2``), evaluated as
the activation dtype's ops: ``x·cos + rot(x)·sin`` with each product and the sum rounded
(hymba-architecture.md §3.5)."""

from __future__ import annotations

import torch

from . import backend


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] (any strides); cos, sin [T, d] in x.dtype -> [T, heads, d], contiguous."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if backend.use_fast(x):
        from ._rope_triton import apply_rope_triton
        return apply_rope_triton(x, cos, sin)
    return apply_rope_ref(x, cos, sin)
