"""Triton RMSNorm, the fast twin of ``rmsnorm.rmsnorm_ref``, and the mixer's two norms averaged
in one pass, the twin of ``rmsnorm.rmsnorm_avg_ref``.

One program normalises ``BLOCK_M`` rows of ``D`` features: fp32 sum of squares, ``rsqrt``, the
normalised row rounded to the activation dtype, then multiplied by the weight (rounded to the
activation dtype first, the product rounded again), exactly the ref's two roundings. Small ``D``
(the 16-wide B/C norms, the 100-wide dt norm) packs many rows into one program; large ``D``
(1600, 3200) takes one or two rows per program. The averaged pair reads both inputs once and
writes one output, where the ref makes four passes (two norms, the add, the halving), with the
ref's roundings: each norm as above, their sum, then the half.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normed(x_ptr, w_ptr, y_ptr, rows, cols, mask, mask_d, stride_xm, D, eps):
    """The rows' RMSNorm times the weight, rounded to y's dtype (returned in fp32)."""
    out_ty = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=1) / D
    rstd = 1.0 / tl.sqrt(ms + eps)
    normed = (x * rstd[:, None]).to(out_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(out_ty).to(tl.float32)
    # A product of two values of the activation dtype is exact in fp32 (bf16/fp16 mantissas), so
    # rounding it once equals the ref's product in the activation dtype.
    return (normed * w[None, :]).to(out_ty).to(tl.float32)


@triton.jit
def _tile(M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows and columns, the column mask and the tile's mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    return rows, cols, mask_d, (rows < M)[:, None] & mask_d[None, :]


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, M, D, stride_xm, stride_ym, eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, mask_d, mask = _tile(M, D, BLOCK_M, BLOCK_D)
    y = _normed(x_ptr, w_ptr, y_ptr, rows, cols, mask, mask_d, stride_xm, D, eps)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_avg_kernel(a_ptr, wa_ptr, b_ptr, wb_ptr, y_ptr, M, D, stride_am, stride_bm, stride_ym, eps,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, mask_d, mask = _tile(M, D, BLOCK_M, BLOCK_D)
    na = _normed(a_ptr, wa_ptr, y_ptr, rows, cols, mask, mask_d, stride_am, D, eps)
    nb = _normed(b_ptr, wb_ptr, y_ptr, rows, cols, mask, mask_d, stride_bm, D, eps)
    y = (na + nb) * 0.5  # halving is exact: rounding this once equals rounding the sum, then halving
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# Elements per program (rows x padded D); the benchmark (jobs/bench/kernels.py) overrides it.
RMSNORM_CONFIG = {"MAX_TILE": 2048}


def _config(D: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(1024, RMSNORM_CONFIG["MAX_TILE"] // block_d))
    tile = block_m * block_d
    num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
    return block_m, block_d, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    if D > 65536:
        raise ValueError(f"rmsnorm_triton supports D <= 65536, got {D}")
    x2 = x.reshape(-1, D)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(0) == 1 else w.contiguous()


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x.dtype (see ``rmsnorm_ref``)."""
    x2 = _rows(x)
    M, D = x2.shape
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    if M > 0 and D > 0:
        block_m, block_d, num_warps = _config(D)
        _rmsnorm_kernel[(triton.cdiv(M, block_m),)](
            x2, _unit(weight), y, M, D, x2.stride(0), y.stride(0), float(eps),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return y.view(x.shape)


def rmsnorm_avg_triton(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """(rmsnorm(a, wa) + rmsnorm(b, wb)) / 2 in a.dtype (see ``rmsnorm_avg_ref``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"rmsnorm_avg: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} differ")
    a2, b2 = _rows(a), _rows(b)
    M, D = a2.shape
    y = torch.empty((M, D), dtype=a.dtype, device=a.device)
    if M > 0 and D > 0:
        block_m, block_d, num_warps = _config(D)
        _rmsnorm_avg_kernel[(triton.cdiv(M, block_m),)](
            a2, _unit(wa), b2, _unit(wb), y, M, D, a2.stride(0), b2.stride(0), y.stride(0), float(eps),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return y.view(a.shape)
