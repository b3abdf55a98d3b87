"""Triton Mamba-1 selective scan over packed sequences, and the single-step state update; the fast
twins of ``scan.selective_scan_varlen_ref`` / ``scan.selective_state_update_ref``.

Prefill: one program per (sequence, block of ``BLOCK_E`` channels), a sequential loop over that
sequence's tokens with the ``[BLOCK_E, N]`` fp32 state in registers (with Triton <= 3.6 each thread
holds whole channels). The state comes from and goes back to the fp32 pool ``state[slot]``. Each
step loads ``BLOCK_E`` values of u, delta and z (contiguous along channels) and the ``N`` values of
B and C (fp32 rows, the same for every thread). The loop runs in groups of four steps with the next
group's u, delta and z loaded before the current group is computed, so several steps of loads are in
flight while the recurrence (a dependency chain) runs, and without per-step tail masks; a plain loop
does the last < 4 steps. B and C are loaded at use: held eight steps ahead they took ~256 registers
a thread and spilled. ``exp(dt*A)`` is ``exp2(dt * (A*log2 e))`` with the pre-scale done once per
program (it compiles to ``ex2.approx``; inline ``ex2.approx.ftz`` PTX measured the same). The work
is issue/exp-bound (N exps per channel per token), not bandwidth-bound: 64 x 1024 tokens took ~2.5
ms on an H200 (~0.7 TB/s of the minimum bytes).
Static sm_90 counts of the four-step loop at 32 channels a warp (``jobs/bench/scan_static.py``;
not yet timed): Triton 3.6, the H200 image's, 650 instructions, 134 registers, no shared memory,
no spill, where the layout before (B and C widened from bf16 in the loop, A in a layout of its
own, B and C loaded ahead) took 1,035 instructions, 255 registers, 160 bytes of stack and two
shared-memory round trips with barriers a step; Triton 3.9, 738 instructions and 133 registers
against 789 and 223 (three shared-memory round trips a step in both). See the A stride below.

Decode: one program per (sequence, channel block); reads the slot's state, one step, writes it.
No host syncs: the grid is (B, E/BLOCK_E) with B = len(cu_seqlens) - 1, each program loops to its
own sequence's length.
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import backend


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2(x, HW_MATH: tl.constexpr):
    # HW_MATH: lg2.approx (MUFU.LG2, absolute error ~2^-22); tl.log2 compiles to libdevice's
    # polynomial (~20 instructions), and is what the interpreter can run
    if HW_MATH:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _div(a, b, HW_MATH: tl.constexpr):
    # HW_MATH: __fdividef (a reciprocal and a product, 2 ulp; 0 for |b| > 2^126) instead of the
    # IEEE division's ~10 instructions
    if HW_MATH:
        return libdevice.fast_dividef(a, b)
    return a / b


@triton.jit
def _softplus(x, HW_MATH: tl.constexpr):
    # softplus with threshold 20 (torch's F.softplus(x, 1, 20)): log1p(y), y = e^x, by its series up
    # to y^6 where y < 1/8 (there an approximate log2 of 1 + y would lose y's low bits), else
    # log2(1 + y)·ln 2. Within 2e-6 relative of the exact value for x in [-40, 20], lg2.approx's
    # absolute error of 2^-22.6 included (numpy check). Per channel and step, tl.log and the
    # Goldberg division compiled to ~45 instructions, about 40% of the scan's loop (sm_90 SASS).
    y = tl.exp2(tl.minimum(x, 20.0) * LOG2E)
    series = y * (1.0 + y * (-0.5 + y * (0.3333333333333333 + y * (-0.25 + y * (0.2 - y * 0.16666666666666666)))))
    lp = tl.where(y < 0.125, series, _log2(1.0 + y, HW_MATH) * LN2)
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _silu(z, HW_MATH: tl.constexpr):
    return _div(z, 1.0 + tl.exp2(-z * LOG2E), HW_MATH)


@triton.jit
def _load_udz(t, end, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E):
    """Step t's u, delta, z [BLOCK_E] in fp32 (zeros past the end); the ``*_row`` arguments are
    pointer vectors of token 0."""
    # (masks built as `offs < limit` rather than `mask & scalar_bool`: the Triton 3.9
    # interpreter mis-broadcasts scalar booleans)
    me = offs_e < tl.where(t < end, E, 0)
    u = tl.load(u_row + t * stride_ut, mask=me, other=0.0).to(tl.float32)
    d = tl.load(d_row + t * stride_dt, mask=me, other=0.0).to(tl.float32)
    z = tl.load(z_row + t * stride_zt, mask=me, other=0.0).to(tl.float32)
    return u, d, z


@triton.jit
def _step(h, t, u, d, z, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias, y_ptrs, stride_yt,
          mask_e, HW_MATH: tl.constexpr, EVEN_N: tl.constexpr):
    """One recurrence step for BLOCK_E channels (t is always inside the sequence): loads step
    t's B and C [BLOCK_N] (fp32 rows), returns the new state, stores y_t."""
    if EVEN_N:
        b = tl.load(b_row + t * stride_bt)
        c = tl.load(c_row + t * stride_ct)
    else:
        b = tl.load(b_row + t * stride_bt, mask=mask_n, other=0.0)
        c = tl.load(c_row + t * stride_ct, mask=mask_n, other=0.0)
    dt = _softplus(d + dbias, HW_MATH)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * b[None, :]
    y = tl.sum(h * c[None, :], axis=1) + Dv * u
    y = y * _silu(z, HW_MATH)
    tl.store(y_ptrs + t * stride_yt, y.to(y_ptrs.dtype.element_ty), mask=mask_e)
    return h


def _triton_before(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return m is not None and (int(m.group(1)), int(m.group(2))) < (major, minor)


# stride_sn is never specialised: a unit stride would let the pool's dtype pick the state's tile
# layout (bf16 pools got 8-wide vectors along N: 1,128 instructions per four steps against 1,032
# for fp32 pools). stride_an is left unspecialised only before Triton 3.7: there A's contiguous rows
# gave A, and with it exp2(dt * A), a layout of four states a thread, converted to the state's
# layout through shared memory with two barriers every step, and unspecialised A, the state and
# the step share one layout (a thread holds whole channels; 32 channels a warp: 650 instructions
# per four steps, 134 registers on 3.6; specialised 728 and 179). From 3.7 on the same kernel with
# A unspecialised lays its tiles out along N (1,198-1,202 instructions, 214-216 registers), and
# specialised it takes 738-756 and 128-133 (sm_90, static: jobs/bench/scan_static.py; not timed).
@triton.jit(do_not_specialize=["stride_sn"] + (["stride_an"] if _triton_before(3, 7) else []))
def _scan_varlen_kernel(u_ptr, d_ptr, z_ptr, y_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr,
                        cu_ptr, slot_ptr, state_ptr, E, N,
                        stride_ut, stride_dt, stride_zt, stride_yt,
                        stride_ae, stride_an, stride_bt, stride_bn, stride_ct, stride_cn,
                        stride_ss, stride_se, stride_sn,
                        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL4: tl.constexpr,
                        HW_MATH: tl.constexpr, EVEN_N: tl.constexpr):
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
        # Full groups of four steps, the next group's u, delta and z loaded before the current
        # group is computed (~8 steps of them in flight); B and C at use (every thread holds all
        # N of them: eight steps ahead took ~256 registers a thread and spilled). The remainder
        # (< 4 steps) below.
        t_rem = start + ((end - start) // 4) * 4
        u0, d0, z0 = _load_udz(start, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
        u1, d1, z1 = _load_udz(start + 1, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
        u2, d2, z2 = _load_udz(start + 2, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
        u3, d3, z3 = _load_udz(start + 3, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
        for t in range(start, t_rem, 4):
            nu0, nd0, nz0 = _load_udz(t + 4, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
            nu1, nd1, nz1 = _load_udz(t + 5, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
            nu2, nd2, nz2 = _load_udz(t + 6, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
            nu3, nd3, nz3 = _load_udz(t + 7, t_rem, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
            h = _step(h, t, u0, d0, z0, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias,
                      y_row, stride_yt, mask_e, HW_MATH, EVEN_N)
            h = _step(h, t + 1, u1, d1, z1, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias,
                      y_row, stride_yt, mask_e, HW_MATH, EVEN_N)
            h = _step(h, t + 2, u2, d2, z2, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias,
                      y_row, stride_yt, mask_e, HW_MATH, EVEN_N)
            h = _step(h, t + 3, u3, d3, z3, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias,
                      y_row, stride_yt, mask_e, HW_MATH, EVEN_N)
            u0, d0, z0 = nu0, nd0, nz0
            u1, d1, z1 = nu1, nd1, nz1
            u2, d2, z2 = nu2, nd2, nz2
            u3, d3, z3 = nu3, nd3, nz3
    for t in range(t_rem, end):
        u, d, z = _load_udz(t, end, u_row, d_row, z_row, stride_ut, stride_dt, stride_zt, offs_e, E)
        h = _step(h, t, u, d, z, b_row, c_row, stride_bt, stride_ct, mask_n, A2, Dv, dbias,
                  y_row, stride_yt, mask_e, HW_MATH, EVEN_N)

    # empty sequences leave their slot untouched, like the ref
    keep_e = offs_e < tl.where(end > start, E, 0)
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=keep_e[:, None] & mask_n[None, :])


@triton.jit
def _state_update_kernel(u_ptr, d_ptr, z_ptr, y_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr,
                         slot_ptr, state_ptr, E, N,
                         stride_ub, stride_db, stride_zb, stride_yb,
                         stride_ae, stride_an, stride_bb, stride_bn, stride_cb, stride_cn,
                         stride_ss, stride_se, stride_sn,
                         BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, HW_MATH: tl.constexpr):
    b = tl.program_id(0)
    pid_e = tl.program_id(1)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < E
    mask_n = offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]
    s_ptrs = state_ptr + slot * stride_ss + offs_e[:, None] * stride_se + offs_n[None, :] * stride_sn
    h = tl.load(s_ptrs, mask=mask_en, other=0.0).to(tl.float32)
    A2 = tl.load(A_ptr + offs_e[:, None] * stride_ae + offs_n[None, :] * stride_an,
                 mask=mask_en, other=0.0).to(tl.float32) * 1.4426950408889634
    Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    dbias = tl.load(dbias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    bb = b.to(tl.int64)
    u = tl.load(u_ptr + bb * stride_ub + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + bb * stride_db + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + bb * stride_zb + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    bv = tl.load(B_ptr + bb * stride_bb + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
    cv = tl.load(C_ptr + bb * stride_cb + offs_n * stride_cn, mask=mask_n, other=0.0).to(tl.float32)
    dt = _softplus(d + dbias, HW_MATH)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * bv[None, :]
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_en)
    y = tl.sum(h * cv[None, :], axis=1) + Dv * u
    y = y * _silu(z, HW_MATH)
    tl.store(y_ptr + bb * stride_yb + offs_e, y.to(y_ptr.dtype.element_ty), mask=mask_e)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(u, delta, A, B, C, D, z, delta_bias, state):
    E, N = A.shape
    for name, t, shape in (("u", u, (E,)), ("delta", delta, (E,)), ("z", z, (E,)),
                           ("B", B, (N,)), ("C", C, (N,))):
        if t.dim() != 2 or t.shape[1:] != shape or t.shape[0] != u.shape[0]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{u.shape[0]}, {shape[0]}]")
    if D.shape != (E,) or delta_bias.shape != (E,) or state.shape[1:] != (E, N):
        raise ValueError(f"D {tuple(D.shape)}, delta_bias {tuple(delta_bias.shape)}, "
                         f"state {tuple(state.shape)} do not match A [{E}, {N}]")
    return E, N


# Launch parameters (None = chosen per call, see _scan_launch) and UNROLL4 (see the module
# docstring). The benchmark (jobs/bench/kernels.py) overrides them to compare variants.
SCAN_CONFIG = {"BLOCK_E": None, "num_warps": None, "UNROLL4": True}
UPDATE_CONFIG = {"BLOCK_E": 128, "num_warps": 2}


def _hw_math() -> bool:
    """The softplus and gate from lg2.approx and __fdividef when compiled (an S-shaped prefill
    scan, 16 x 1,024 tokens on an H200: 0.957 ms against 1.075 with IEEE log and division,
    kernels-h200-2026-12-05b.json); the interpreter has no libdevice and runs the IEEE ops."""
    return not backend.interpret_mode()


def _scan_launch(n_seqs: int, E: int) -> tuple[int, int]:
    """BLOCK_E and num_warps: one warp of 32 channels (a channel a thread), 16 when that leaves
    fewer than 256 programs (the time loop is sequential: parallelism comes only from sequences x
    channel blocks). Chosen from static sm_90 counts (Triton 3.6), not yet timed: 32 channels take
    134 registers (15 warps an SM), 64 take 245 (8 warps) for 1.8x the instructions; with the
    layout before (255 registers and spills either way) an H200 ran 64 x 1024 tokens in 2.54 ms
    with 64/1 (128/2: 2.58; 32/4 was 4.9) and 8 x 4096 in 1.77 ms with 32/1 (16/1: 3.09)."""
    block_e = SCAN_CONFIG["BLOCK_E"]
    if block_e is None:
        block_e = 32 if n_seqs * triton.cdiv(E, 32) >= 256 else 16
    block_e = min(block_e, triton.next_power_of_2(E))
    num_warps = SCAN_CONFIG["num_warps"] or 1
    return block_e, num_warps


def selective_scan_varlen_triton(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx):
    """u, delta, z [T, E] (row stride free); A [E, N] fp32; B, C [T, N]; D, delta_bias [E];
    cu_seqlens [B+1]; state [S, E, N] (fp32; initial state read from and final state written to
    ``state[slot_idx[b]]``); slot_idx [B]. Returns y [T, E] in u.dtype."""
    E, N = _check(u, delta, A, B, C, D, z, delta_bias, state)
    u, delta, z = _rows(u), _rows(delta), _rows(z)
    # B and C in fp32 (exact: bf16 widens without rounding): each thread reads all N of them every
    # step, and widening them in the loop took ~60 of its ~230 instructions a step (sm_90, static)
    B, C = B.float(), C.float()
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
        HW_MATH=_hw_math(), EVEN_N=triton.next_power_of_2(N) == N, num_warps=num_warps)
    return y


def selective_state_update_triton(state, slot_idx, u, delta, A, B, C, D, z, delta_bias):
    """One token per sequence: u, delta, z [B, E]; B, C [B, N]; state [S, E, N] updated in place
    at ``slot_idx`` [B]. Returns y [B, E] in u.dtype."""
    E, N = _check(u, delta, A, B, C, D, z, delta_bias, state)
    u, delta, z = _rows(u), _rows(delta), _rows(z)
    Bn = u.shape[0]
    y = torch.empty((Bn, E), dtype=u.dtype, device=u.device)
    if Bn == 0 or E == 0:
        return y
    slot_idx = slot_idx.to(device=u.device)
    block_e = min(UPDATE_CONFIG["BLOCK_E"], triton.next_power_of_2(E))
    _state_update_kernel[(Bn, triton.cdiv(E, block_e))](
        u, delta, z, y, A, B, C, D, delta_bias, slot_idx, state, E, N,
        u.stride(0), delta.stride(0), z.stride(0), y.stride(0),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        BLOCK_E=block_e, BLOCK_N=triton.next_power_of_2(N),
        HW_MATH=_hw_math(), num_warps=UPDATE_CONFIG["num_warps"])
    return y
