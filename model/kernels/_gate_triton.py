"""Triton SiLU gate, the fast twin of ``gate.silu_mul_ref``: one pass reading g and u and writing
the product, where the ref makes two (SiLU, then the product) and writes SiLU(g) in between.
SiLU in fp32 as ``g / (1 + exp(-g))``, rounded to the activation dtype, times u, rounded again."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ty = y_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(y_ptr + offs, (act * u).to(ty), mask=mask)


GATE_CONFIG = {"BLOCK": 2048, "num_warps": 8}


def silu_mul_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u [..., I] of one shape -> SiLU(g) * u in g.dtype."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"silu_mul: g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} differ")
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, GATE_CONFIG["BLOCK"]),)](
            g, u, y, n, BLOCK=GATE_CONFIG["BLOCK"], num_warps=GATE_CONFIG["num_warps"])
    return y
