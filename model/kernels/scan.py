"""Mamba-1 selective scan over packed sequences with initial states, and the single-step update.

Math (fp32 inside, hymba-architecture.md §3.4), per channel c and state n:
    dt = softplus(delta + delta_bias)            (softplus(x) = x for x > 20)
    h  = exp(dt * A[c, n]) * h + dt * B[n] * u
    y  = (sum_n C[n] * h[n] + D[c] * u) * SiLU(z)
``A`` is already ``-exp(A_log)`` in fp32. State pools are fp32 ``[S, E, N]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x, beta=1.0, threshold=20.0)


def selective_scan_varlen_ref(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx):
    """u, delta, z [T, E]; A [E, N] fp32; B, C [T, N]; D, delta_bias [E]; cu_seqlens [B+1];
    state [S, E, N] fp32 (initial state read from, final state written to, slot_idx [B]).
    Returns y [T, E] in u.dtype."""
    y = torch.empty_like(u)
    Af = A.float()
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(slot_idx.tolist()):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        uf = u[s:e].float()
        dt = _softplus(delta[s:e].float() + delta_bias.float())          # [L, E]
        dA = torch.exp(dt[:, :, None] * Af)                              # [L, E, N]
        dBu = dt[:, :, None] * B[s:e, None, :].float() * uf[:, :, None]  # [L, E, N]
        Cf = C[s:e].float()
        h = state[slot].float()
        ys = torch.empty_like(uf)
        for t in range(e - s):
            h = dA[t] * h + dBu[t]
            ys[t] = h @ Cf[t]
        state[slot] = h
        y[s:e] = ((ys + D.float() * uf) * F.silu(z[s:e].float())).to(u.dtype)
    return y


def selective_state_update_ref(state, slot_idx, u, delta, A, B, C, D, z, delta_bias):
    """One token per sequence: u, delta, z [B, E]; B, C [B, N]; state [S, E, N] fp32 in place."""
    uf = u.float()
    dt = _softplus(delta.float() + delta_bias.float())
    h = state[slot_idx].float()
    h = torch.exp(dt[:, :, None] * A.float()) * h + dt[:, :, None] * B.float()[:, None, :] * uf[:, :, None]
    state[slot_idx] = h.to(state.dtype)
    y = (h @ C.float()[:, :, None]).squeeze(-1)
    return ((y + D.float() * uf) * F.silu(z.float())).to(u.dtype)


def selective_scan_varlen(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx):
    if backend.use_fast(u):
        from ._scan_triton import selective_scan_varlen_triton
        return selective_scan_varlen_triton(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx)
    return selective_scan_varlen_ref(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, state, slot_idx)


def selective_state_update(state, slot_idx, u, delta, A, B, C, D, z, delta_bias):
    if backend.use_fast(u):
        from ._scan_triton import selective_state_update_triton
        return selective_state_update_triton(state, slot_idx, u, delta, A, B, C, D, z, delta_bias)
    return selective_state_update_ref(state, slot_idx, u, delta, A, B, C, D, z, delta_bias)
