"""Attention with Hymba's masks: GQA (query head h uses KV head h // group), scale 1/sqrt(d_qk),
V wider than Q/K, and per layer either global causal or sliding-window-plus-meta masking.

Mask on meta-inclusive indices (project convention, design.md §3): key j is visible to query i
when ``j <= i`` and, on sliding-window layers, ``i - j <= window or j < num_meta``.

Three uses: uncached (``attention_ref``), decode of one token per sequence over
the engine's caches (``attention_decode``), and packed varlen prefill chunks continuing from
those caches (``attention_prefill``); each cached op dispatches to a Triton kernel or its twin.
"""

from __future__ import annotations

import math

import torch


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


# ---- decode over the engine's caches -----------------------------------------------------------
#
# Cache layouts (one tensor per KV-producing layer):
#   ring  (sliding-window layers): k [S, R, nkv, d], v [S, R, nkv, dv] with R = window + 1;
#         real token m of the sequence in slot s lives at [s, m % R].
#   paged (global layers):         k [num_blocks, bs, nkv, d], v [num_blocks, bs, nkv, dv];
#         real token m lives at [block_table[s, m // bs], m % bs].
# The current token is written to the cache before attending, so a decode query reads
# exactly: all meta tokens + its own real tokens max(0, n - window) .. n (n = ctx_len - 1).


def decode_positions(ctx_len: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token positions each decode query attends: (pos [B, Tmax] long, valid [B, Tmax] bool)."""
    n = ctx_len.long()
    first = (n - 1 - window).clamp(min=0) if window is not None else torch.zeros_like(n)
    count = n - first
    tmax = int(count.max()) if count.numel() else 0
    ar = torch.arange(tmax, device=n.device)
    pos = first[:, None] + ar[None, :]
    return pos, ar[None, :] < count[:, None]


def gather_cache(cache: torch.Tensor, slot_idx: torch.Tensor, pos: torch.Tensor,
                 block_table: torch.Tensor | None) -> torch.Tensor:
    """Rows of a ring or paged cache at real positions pos [B, T] -> [B, T, heads, dim]."""
    if block_table is None:
        R = cache.shape[1]
        return cache[slot_idx[:, None], pos % R]
    bs = cache.shape[1]
    blocks = block_table[slot_idx[:, None], pos // bs]
    return cache[blocks, pos % bs]


def attention_decode_ref(q: torch.Tensor, meta_k: torch.Tensor, meta_v: torch.Tensor,
                         cache_k: torch.Tensor, cache_v: torch.Tensor, slot_idx: torch.Tensor,
                         ctx_len: torch.Tensor, window: int | None,
                         block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, nh, d] (one query per sequence); meta_k [M, nkv, d], meta_v [M, nkv, dv] shared by all;
    cache_* ring (block_table None) or paged; slot_idx [B]; ctx_len [B] = real tokens incl. the
    current one (already written). Returns [B, nh*dv] in q.dtype, softmax in fp32."""
    B, nh, d = q.shape
    pos, valid = decode_positions(ctx_len, window)
    pos = pos.where(valid, torch.zeros_like(pos))
    k = gather_cache(cache_k, slot_idx, pos, block_table)  # [B, T, nkv, d]
    v = gather_cache(cache_v, slot_idx, pos, block_table)
    M = meta_k.shape[0]
    k = torch.cat([meta_k.expand(B, *meta_k.shape), k], 1)
    v = torch.cat([meta_v.expand(B, *meta_v.shape), v], 1)
    mask = torch.cat([torch.ones(B, M, dtype=torch.bool, device=q.device), valid], 1)  # [B, Tk]
    group = nh // k.shape[2]
    kk = k.repeat_interleave(group, dim=2).permute(0, 2, 3, 1).float()  # [B, nh, d, Tk]
    vv = v.repeat_interleave(group, dim=2).permute(0, 2, 1, 3).float()  # [B, nh, Tk, dv]
    scores = (q.float()[:, :, None, :] @ kk).squeeze(2) * (1.0 / math.sqrt(d))  # [B, nh, Tk]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, -1)
    out = (p[:, :, None, :] @ vv).squeeze(2)  # [B, nh, dv]
    return out.reshape(B, -1).to(q.dtype)


def attention_decode(q, meta_k, meta_v, cache_k, cache_v, slot_idx, ctx_len, window, block_table=None):
    """Decode attention; Triton kernel on CUDA (no gather copies, no host sync), else the twin."""
    from . import backend
    if backend.use_fast(q):
        from ._attn_decode_triton import attention_decode_triton
        return attention_decode_triton(q, meta_k, meta_v, cache_k, cache_v, slot_idx, ctx_len, window, block_table)
    return attention_decode_ref(q, meta_k, meta_v, cache_k, cache_v, slot_idx, ctx_len, window, block_table)


# ---- packed varlen prefill over the engine's caches ---------------------------------------------
#
# One prefill step packs B sequences' chunks: sequence b owns rows [cu[b], cu[b+1]) of q / k / v,
# and its chunk row i is real position p = start[b] + i. A query sees all meta keys and the real
# tokens m <= p of its sequence with p - m <= window (window None: no limit). Tokens m < start[b]
# come from the cache (layouts above; the ring holds the window + 1 latest positions, enough for
# every visible history token); tokens m >= start[b] come from the packed k / v (the engine writes
# the chunk into the cache only after every layer that reads it has run).


PREFILL_REF_QUERY_BLOCK = 128  # query rows per attention_ref call: memory ~ block x visible keys


def attention_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta_k: torch.Tensor,
                          meta_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                          slot_idx: torch.Tensor, start: torch.Tensor, cu: torch.Tensor,
                          window: int | None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, nh, d], k [T, nkv, d], v [T, nkv, dv] packed chunks; meta_k [M, nkv, d], meta_v
    [M, nkv, dv] shared by all; cache_* ring (block_table None) or paged; slot_idx [B]; start [B]
    tokens already cached per sequence; cu [B+1] (cu[0] = 0, cu[B] = T). Returns [T, nh*dv] in
    q.dtype, softmax in fp32.

    Per sequence, its [meta | history | chunk] keys are assembled once; then each block of
    ``PREFILL_REF_QUERY_BLOCK`` queries runs ``attention_ref`` over the meta keys and only the real
    keys that block can see. Nothing is padded to the step's longest sequence, so memory is bounded
    by the block size times the visible context, whatever the mix of lengths in the step."""
    M = meta_k.shape[0]
    dev = q.device
    out = q.new_empty(q.shape[0], q.shape[1] * meta_v.shape[-1])
    meta_idx = torch.arange(M, device=dev)
    starts, bounds = start.tolist(), cu.tolist()
    for b, s0 in enumerate(starts):
        lo, hi = bounds[b], bounds[b + 1]
        first = 0 if window is None else max(0, s0 - window)
        pos = torch.arange(first, s0, device=dev)
        hk = gather_cache(cache_k, slot_idx[b:b + 1], pos[None], block_table)[0]
        hv = gather_cache(cache_v, slot_idx[b:b + 1], pos[None], block_table)[0]
        real_k = torch.cat([hk, k[lo:hi]])  # real positions first .. s0 + (hi - lo) - 1
        real_v = torch.cat([hv, v[lo:hi]])
        for i0 in range(0, hi - lo, PREFILL_REF_QUERY_BLOCK):
            i1 = min(i0 + PREFILL_REF_QUERY_BLOCK, hi - lo)
            k_lo = first if window is None else max(first, s0 + i0 - window)  # oldest visible real key
            k_hi = s0 + i1                                                    # one past the newest
            keys = torch.cat([meta_k, real_k[k_lo - first:k_hi - first]])
            vals = torch.cat([meta_v, real_v[k_lo - first:k_hi - first]])
            k_idx = torch.cat([meta_idx, M + torch.arange(k_lo, k_hi, device=dev)])
            q_idx = M + torch.arange(s0 + i0, s0 + i1, device=dev)
            out[lo + i0:lo + i1] = attention_ref(q[lo + i0:lo + i1], keys, vals, q_idx, k_idx, window, M)
    return out


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta_k: torch.Tensor,
                      meta_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      slot_idx: torch.Tensor, start: torch.Tensor, cu: torch.Tensor, window: int | None,
                      block_table: torch.Tensor | None = None, *, max_chunk: int, max_hist: int) -> torch.Tensor:
    """Prefill attention (shapes as ``attention_prefill_ref``); Triton kernel on CUDA (no gather
    copies, no padding, no host sync), else the twin. Host ints: ``max_chunk`` >= every chunk
    length, ``max_hist`` >= the history any query of the step sees (min(start, window) with a
    window, start without)."""
    from . import backend
    if backend.use_fast(q):
        from ._attn_prefill_triton import attention_prefill_triton
        return attention_prefill_triton(q, k, v, meta_k, meta_v, cache_k, cache_v, slot_idx, start, cu,
                                        window, block_table, max_chunk=max_chunk, max_hist=max_hist)
    return attention_prefill_ref(q, k, v, meta_k, meta_v, cache_k, cache_v, slot_idx, start, cu,
                                 window, block_table)
