"""Depthwise causal conv1d + SiLU over packed sequences, and its single-step update.

State (per slot) holds the last ``K-1`` *pre-conv* inputs, oldest first: ``state [S, C, K-1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def causal_conv1d_varlen_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             cu_seqlens: torch.Tensor, state: torch.Tensor,
                             slot_idx: torch.Tensor) -> torch.Tensor:
    """x [T, C] packed; weight [C, K]; bias [C]; cu_seqlens [B+1]; state [S, C, K-1] (read as the
    history before each sequence, overwritten with its last K-1 inputs); slot_idx [B].
    Returns SiLU(conv) [T, C] in x.dtype (fp32 accumulate)."""
    K = weight.shape[1]
    out = torch.empty_like(x)
    w = weight.float()
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(slot_idx.tolist()):
        s, e = cu[b], cu[b + 1]
        L = e - s
        if L == 0:
            continue
        xs = torch.cat([state[slot].t().to(x.dtype), x[s:e]], 0).float()  # [K-1+L, C]
        acc = torch.zeros(L, x.shape[1], dtype=torch.float32, device=x.device)
        if bias is not None:
            acc += bias.float()
        for j in range(K):
            acc += w[:, j] * xs[j:j + L]
        out[s:e] = F.silu(acc).to(x.dtype)
        state[slot] = xs[-(K - 1):].t().to(state.dtype)
    return out


def causal_conv1d_update_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             state: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
    """One new token per sequence: x [B, C]; state [S, C, K-1] updated in place; -> [B, C]."""
    xs = torch.cat([state[slot_idx].to(x.dtype), x[:, :, None]], -1).float()  # [B, C, K]
    acc = (xs * weight.float()).sum(-1)
    if bias is not None:
        acc += bias.float()
    state[slot_idx] = xs[:, :, 1:].to(state.dtype)
    return F.silu(acc).to(x.dtype)


def causal_conv1d_varlen(x, weight, bias, cu_seqlens, state, slot_idx):
    if backend.use_fast(x):
        from ._conv_triton import causal_conv1d_varlen_triton
        return causal_conv1d_varlen_triton(x, weight, bias, cu_seqlens, state, slot_idx)
    return causal_conv1d_varlen_ref(x, weight, bias, cu_seqlens, state, slot_idx)


def causal_conv1d_update(x, weight, bias, state, slot_idx):
    if backend.use_fast(x):
        from ._conv_triton import causal_conv1d_update_triton
        return causal_conv1d_update_triton(x, weight, bias, state, slot_idx)
    return causal_conv1d_update_ref(x, weight, bias, state, slot_idx)
