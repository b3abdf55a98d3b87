"""Attention with Hymba's masks: GQA (query head h uses KV head h // group), scale 1/sqrt(d_qk),
V wider than Q/K, and per layer either global causal or sliding-window-plus-meta masking.

Mask on meta-inclusive indices (project convention, design.md §3): key j is visible to query i
when ``j <= i`` and, on sliding-window layers, ``i - j <= window or j < num_meta``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hymba_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None, num_meta: int) -> torch.Tensor:
    """[Tq, Tk] bool: True where the key is visible."""
    qi, kj = q_idx[:, None], k_idx[None, :]
    m = kj <= qi
    if window is not None:
        m &= ((qi - kj) <= window) | (kj < num_meta)
    return m


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                  k_idx: torch.Tensor, window: int | None, num_meta: int) -> torch.Tensor:
    """q [Tq, nh, d]; k [Tk, nkv, d]; v [Tk, nkv, dv]; q_idx [Tq], k_idx [Tk] meta-inclusive
    indices. Returns [Tq, nh*dv] (head-major), softmax in fp32, output in q.dtype."""
    nh, d = q.shape[1], q.shape[2]
    group = nh // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [nh, Tk, d]
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [nh, Tk, dv]
    qq = q.transpose(0, 1).float()
    scores = (qq @ kk.transpose(1, 2)) * (1.0 / math.sqrt(d))
    mask = hymba_mask(q_idx, k_idx, window, num_meta)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (p @ vv).to(q.dtype)  # [nh, Tq, dv]
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched fast path: q [B, nh, Tq, d]; k [B, nkv, Tk, d]; v [B, nkv, Tk, dv];
    mask [B, 1, Tq, Tk] bool. Returns [B, nh, Tq, dv]. Uses PyTorch SDPA (flash / efficient /
    cuDNN kernels chosen by PyTorch); GQA by expanding KV heads."""
    nh, nkv = q.shape[1], k.shape[1]
    if nh != nkv:
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
