"""The prefill scan kernel as it was at dbd7a74 (2026-12-05, the last one timed on an H200),
frozen here as the same-run baseline of the kernels and engine benches (``jobs/bench/h200.sh scan``
and ``tune``) for the layout that replaced it (``model/kernels/_scan_triton.py``; its docstring
says what changed). Not used by the engine; delete once the new layout is timed. The helpers it
shares with the new kernel (softplus, SiLU, the checks) are imported from there, unchanged."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hymba_batch.model.kernels._scan_triton import _check, _hw_math, _rows, _silu, _softplus  # unchanged


@triton.jit
def _load_bc(t, end, b_row, c_row, stride_bt, stride_ct, offs_n, N):
    """Step t's B and C [BLOCK_N] in fp32 (zeros past the end)."""
    mn = offs_n < tl.where(t < end, N, 0)
    b = tl.load(b_row + t * stride_bt, mask=mn, other=0.0).to(tl.float32)
    c = tl.load(c_row + t * stride_ct, mask=mn, other=0.0).to(tl.float32)
    return b, c


@triton.jit
def _load_step(t, end, u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt,
               stride_bt, stride_ct, offs_e, E, offs_n, N, WITH_BC: tl.constexpr = True):
    """Step t's u, delta, z [BLOCK_E] and B, C [BLOCK_N] in fp32 (zeros past the end); the
    ``*_row`` arguments are pointer vectors of token 0."""
    # (masks built as `offs < limit` rather than `mask & scalar_bool`: the Triton 3.9
    # interpreter mis-broadcasts scalar booleans)
    ok = t < end
    me = offs_e < tl.where(ok, E, 0)
    mn = offs_n < tl.where(ok, N, 0)
    u = tl.load(u_row + t * stride_ut, mask=me, other=0.0).to(tl.float32)
    d = tl.load(d_row + t * stride_dt, mask=me, other=0.0).to(tl.float32)
    z = tl.load(z_row + t * stride_zt, mask=me, other=0.0).to(tl.float32)
    if WITH_BC:
        b = tl.load(b_row + t * stride_bt, mask=mn, other=0.0).to(tl.float32)
        c = tl.load(c_row + t * stride_ct, mask=mn, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(offs_n).to(tl.float32)
        c = b
    return u, d, z, b, c


@triton.jit
def _step(h, t, u, d, z, b, c, A2, Dv, dbias, y_ptrs, stride_yt, mask_e, HW_MATH: tl.constexpr):
    """One recurrence step for BLOCK_E channels: returns the new state, stores y_t."""
    dt = _softplus(d + dbias, HW_MATH)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * b[None, :]
    y = tl.sum(h * c[None, :], axis=1) + Dv * u
    y = y * _silu(z, HW_MATH)
    tl.store(y_ptrs + t * stride_yt, y.to(y_ptrs.dtype.element_ty), mask=mask_e)
    return h


# stride_sn is never specialised: a unit stride would let the pool's dtype pick the tile layout.
# Static counts on sm_90 (BLOCK_E 32, not timed): bf16 pools got 8-wide vectors along N and a loop
# of 1,128 instructions per four steps against 1,032 for fp32 pools; unspecialised, both pools get
# fp32's layout (1,008 / 1,013) and only the state's one load and store per program are scalar.
@triton.jit(do_not_specialize=["stride_sn"])
def _scan_varlen_kernel(u_ptr, d_ptr, z_ptr, y_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr,
                        cu_ptr, slot_ptr, state_ptr, E, N,
                        stride_ut, stride_dt, stride_zt, stride_yt,
                        stride_ae, stride_an, stride_bt, stride_bn, stride_ct, stride_cn,
                        stride_ss, stride_se, stride_sn,
                        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL4: tl.constexpr,
                        HW_MATH: tl.constexpr, PREFETCH_BC: tl.constexpr):
    b = tl.program_id(0)
    pid_e = tl.program_id(1)
    start = tl.load(cu_ptr + b).to(tl.int64)   # int64 token offsets: T * row stride may
    end = tl.load(cu_ptr + b + 1).to(tl.int64)   # exceed 2**31
    slot = tl.load(slot_ptr + b).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < E
    mask_n = offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]

    A2 = tl.load(A_ptr + offs_e[:, None] * stride_ae + offs_n[None, :] * stride_an,
                 mask=mask_en, other=0.0).to(tl.float32) * 1.4426950408889634
    Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    dbias = tl.load(dbias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + offs_e[:, None] * stride_se + offs_n[None, :] * stride_sn
    h = tl.load(s_ptrs, mask=mask_en, other=0.0).to(tl.float32)
    u_row = u_ptr + offs_e
    d_row = d_ptr + offs_e
    z_row = z_ptr + offs_e
    b_row = B_ptr + offs_n * stride_bn
    c_row = C_ptr + offs_n * stride_cn
    y_row = y_ptr + offs_e

    t_rem = start
    if UNROLL4:
        # Full groups of four steps, the next group's loads issued before the current group is
        # computed (so ~8 steps of loads are in flight); the remainder (< 4 steps) below.
        t_rem = start + ((end - start) // 4) * 4
        u0, d0, z0, b0, c0 = _load_step(start, t_rem,
            u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
            stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
        u1, d1, z1, b1, c1 = _load_step(start + 1, t_rem,
            u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
            stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
        u2, d2, z2, b2, c2 = _load_step(start + 2, t_rem,
            u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
            stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
        u3, d3, z3, b3, c3 = _load_step(start + 3, t_rem,
            u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
            stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
        for t in range(start, t_rem, 4):
            nu0, nd0, nz0, nb0, nc0 = _load_step(t + 4, t_rem,
                u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
                stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
            nu1, nd1, nz1, nb1, nc1 = _load_step(t + 5, t_rem,
                u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
                stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
            nu2, nd2, nz2, nb2, nc2 = _load_step(t + 6, t_rem,
                u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
                stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
            nu3, nd3, nz3, nb3, nc3 = _load_step(t + 7, t_rem,
                u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
                stride_ct, offs_e, E, offs_n, N, PREFETCH_BC)
            if not PREFETCH_BC:  # B and C at use: 8 steps of them held take ~256 registers a thread
                b0, c0 = _load_bc(t, t_rem, b_row, c_row, stride_bt, stride_ct, offs_n, N)
            h = _step(h, t, u0, d0, z0, b0, c0, A2, Dv, dbias, y_row, stride_yt, mask_e, HW_MATH)
            if not PREFETCH_BC:
                b1, c1 = _load_bc(t + 1, t_rem, b_row, c_row, stride_bt, stride_ct, offs_n, N)
            h = _step(h, t + 1, u1, d1, z1, b1, c1, A2, Dv, dbias, y_row, stride_yt, mask_e, HW_MATH)
            if not PREFETCH_BC:
                b2, c2 = _load_bc(t + 2, t_rem, b_row, c_row, stride_bt, stride_ct, offs_n, N)
            h = _step(h, t + 2, u2, d2, z2, b2, c2, A2, Dv, dbias, y_row, stride_yt, mask_e, HW_MATH)
            if not PREFETCH_BC:
                b3, c3 = _load_bc(t + 3, t_rem, b_row, c_row, stride_bt, stride_ct, offs_n, N)
            h = _step(h, t + 3, u3, d3, z3, b3, c3, A2, Dv, dbias, y_row, stride_yt, mask_e, HW_MATH)
            u0, d0, z0, b0, c0 = nu0, nd0, nz0, nb0, nc0
            u1, d1, z1, b1, c1 = nu1, nd1, nz1, nb1, nc1
            u2, d2, z2, b2, c2 = nu2, nd2, nz2, nb2, nc2
            u3, d3, z3, b3, c3 = nu3, nd3, nz3, nb3, nc3
    for t in range(t_rem, end):
        u, d, z, bv, cv = _load_step(t, end,
            u_row, d_row, z_row, b_row, c_row, stride_ut, stride_dt, stride_zt, stride_bt,
            stride_ct, offs_e, E, offs_n, N)
        h = _step(h, t, u, d, z, bv, cv, A2, Dv, dbias, y_row, stride_yt, mask_e, HW_MATH)

    # empty sequences leave their slot untouched, like the ref
    keep_e = offs_e < tl.where(end > start, E, 0)
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=keep_e[:, None] & mask_n[None, :])


# Launch parameters (None = chosen per call, see _scan_launch) and PREFETCH_BC (see the module
# docstring). The benchmark (jobs/bench/kernels.py) overrides them to compare variants.
SCAN_CONFIG = {"BLOCK_E": None, "num_warps": None, "UNROLL4": True, "PREFETCH_BC": True}


def _scan_launch(n_seqs: int, E: int) -> tuple[int, int]:
    """BLOCK_E and num_warps. One warp per program; 64 channels (32 state elements per thread)
    while that gives >= 1024 programs, else 32, and 16 when even that leaves fewer than 256 (the
    time loop is sequential: parallelism comes only from sequences x channel blocks). Measured on
    an H200 (bf16, E=3200, N=16): 64 seqs x 1024 tokens 2.54 ms with 64/1 (128/2: 2.58;
    32/4 was 4.9); 8 x 4096 1.77 ms with 32/1 (16/1: 3.09; 128/4: 1.97)."""
    block_e = SCAN_CONFIG["BLOCK_E"]
    if block_e is None:
        block_e = 64
        if n_seqs * triton.cdiv(E, 64) < 1024:
            block_e = 32
        if n_seqs * triton.cdiv(E, 32) < 256:
            block_e = 16
    block_e = min(block_e, triton.next_power_of_2(E))
    num_warps = SCAN_CONFIG["num_warps"] or 1
    return block_e, num_warps


def selective_scan_varlen_triton(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx):
    """u, delta, z [T, E] (row stride free); A [E, N] fp32; B, C [T, N]; D, delta_bias [E];
    cu_seqlens [B+1]; state [S, E, N] (fp32; initial state read from and final state written to
    ``state[slot_idx[b]]``); slot_idx [B]. Returns y [T, E] in u.dtype."""
    E, N = _check(u, delta, A, B, C, D, z, delta_bias, state)
    u, delta, z = _rows(u), _rows(delta), _rows(z)
    T = u.shape[0]
    n_seqs = cu_seqlens.shape[0] - 1
    y = torch.empty((T, E), dtype=u.dtype, device=u.device)
    if n_seqs <= 0 or E == 0:
        return y
    cu = cu_seqlens.to(device=u.device, dtype=torch.int32)
    slot_idx = slot_idx.to(device=u.device)
    block_e, num_warps = _scan_launch(n_seqs, E)
    grid = (n_seqs, triton.cdiv(E, block_e))
    _scan_varlen_kernel[grid](
        u, delta, z, y, A, B, C, D, delta_bias, cu, slot_idx, state, E, N,
        u.stride(0), delta.stride(0), z.stride(0), y.stride(0),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        BLOCK_E=block_e, BLOCK_N=triton.next_power_of_2(N), UNROLL4=SCAN_CONFIG["UNROLL4"],
        HW_MATH=_hw_math(), PREFETCH_BC=SCAN_CONFIG["PREFETCH_BC"], num_warps=num_warps)
    return y
