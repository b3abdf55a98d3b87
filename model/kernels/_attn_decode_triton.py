"""Flash-decoding over the engine's ring / paged KV caches (Triton twin of ``attention_decode_ref``).

One program per (sequence, KV head, split). The program loads the GROUP = nh // nkv query heads
that share its KV head as one [GROUP_P, d] tile (GROUP_P = GROUP padded to a power of two >= 16 so
that ``tl.dot`` applies; padded rows are zeros and are never stored), then walks its share of the
sequence's keys in BLOCK_N blocks: first the shared meta K/V (read in place from [M, nkv, d], never
copied per sequence), then the sequence's own real tokens straight out of the cache:

  ring  (block_table None): token m at cache[slot, m % R], m in [first, n]
  paged (block_table given): token m at cache[block_table[slot, m // bs], m % bs], m in [first, n]

with n = ctx_len - 1 and first = max(0, n - window) (0 when window is None). Scores are fp32
(bf16 x bf16 products on tensor cores accumulate in fp32, exactly like the reference's fp32
matmul up to summation order; fp32 inputs use IEEE dots), online softmax in base 2 with a running
max / sum / acc [GROUP_P, dv] in fp32. P is rounded to the V dtype for the P @ V dot when V is
bf16/fp16 (standard flash-attention practice, ~2^-9 relative), kept fp32 otherwise.

Split-K: when B * nkv programs cannot fill the GPU, each sequence's key range [0, M + count) is cut
into NUM_SPLITS chunks (sized per sequence at run time, so short sequences finish early) whose
normalised partial outputs and base-2 log-sum-exps go to an fp32 scratch; a small combine kernel
merges them. NUM_SPLITS is chosen on the host from B, nkv, the SM count and a *static* bound on the
number of keys -- never from tensor values -- so the wrapper does no host synchronisation and
is safe inside CUDA-graph capture (the grid depends only on B, nkv and static ints).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) dominates
_MAX_SPLITS = 64


@triton.jit
def _online_step(q, k, v, valid, m_i, l_i, acc, qk_scale, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """One key block: q [GP, BD], k [BN, BD], v [BN, BDV], valid broadcastable to [GP, BN] ->
    updated (m, l, acc); the prefill kernel uses it too. EMULATE (Triton interpreter only): its tl.dot multiplies bf16 operands as raw uint16 bits, so
    bf16 dots run as fp32 dots of the same (exactly representable) values, P rounded as on GPU."""
    if LOWP and not EMULATE:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    s = tl.where(valid, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOWP:
        if EMULATE:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _attn_decode_kernel(
    q_ptr, mk_ptr, mv_ptr, k_ptr, v_ptr, slot_ptr, ctx_ptr, bt_ptr,
    out_ptr, opart_ptr, lse_ptr,
    M, R, window, qk_scale,
    stride_qb, stride_qh,
    stride_mkm, stride_mkh, stride_mvm, stride_mvh,
    stride_k0, stride_k1, stride_kh,
    stride_v0, stride_v1, stride_vh,
    stride_bt0, stride_bt1,
    stride_ob,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP: tl.constexpr,
    EMULATE: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)

    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    heads = g * GROUP + offs_g

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)

    slot = tl.load(slot_ptr + b).to(tl.int64)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    if HAS_WINDOW:
        first = tl.maximum(ctx - 1 - window, 0)
    else:
        first = ctx * 0
    count = ctx - first
    total = M + count

    # this split's share [lo, hi) of the key range: meta at [0, M), real token first + j at M + j
    if NUM_SPLITS == 1:
        lo = sp * 0
        hi = total
    else:
        chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, total)

    m_i = tl.full([GROUP_P], -1.0e30, dtype=tl.float32)  # finite: an all-masked block stays NaN-free
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_DV], dtype=tl.float32)

    # ---- shared meta tokens, read in place -----------------------------------------------------
    meta_hi = tl.minimum(hi, M)
    mk_base = mk_ptr + g * stride_mkh
    mv_base = mv_ptr + g * stride_mvh
    for start in range(lo, meta_hi, BLOCK_N):
        t = start + offs_n
        valid = t < meta_hi
        k = tl.load(mk_base + t[:, None] * stride_mkm + offs_d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(mv_base + t[:, None] * stride_mvm + offs_dv[None, :],
                    mask=valid[:, None] & mask_dv[None, :], other=0.0)
        m_i, l_i, acc = _online_step(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, LOWP, EMULATE)

    # ---- the sequence's own real tokens --------------------------------------------------------
    k_head = k_ptr + g * stride_kh
    v_head = v_ptr + g * stride_vh
    real_lo = tl.maximum(lo, M) - M
    real_hi = hi - M
    for start in range(real_lo, real_hi, BLOCK_N):
        j = start + offs_n
        valid = j < real_hi
        pos = first + j
        if PAGED:
            blk = tl.load(bt_ptr + slot * stride_bt0 + (pos // PAGE) * stride_bt1, mask=valid, other=0)
            blk = blk.to(tl.int64)
            row = pos % PAGE
            k_rows = k_head + blk * stride_k0 + row * stride_k1
            v_rows = v_head + blk * stride_v0 + row * stride_v1
        else:
            row = pos % R
            k_rows = k_head + slot * stride_k0 + row * stride_k1
            v_rows = v_head + slot * stride_v0 + row * stride_v1
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_rows[:, None] + offs_dv[None, :], mask=valid[:, None] & mask_dv[None, :], other=0.0)
        m_i, l_i, acc = _online_step(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, LOWP, EMULATE)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        optrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * DV + offs_dv[None, :]
        tl.store(optrs, o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_dv[None, :])
    else:
        pptrs = (opart_ptr + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + sp * stride_ps
                 + offs_dv[None, :])
        tl.store(pptrs, o, mask=mask_g[:, None] & mask_dv[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # -inf: empty split
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + sp, lse, mask=mask_g)


@triton.jit
def _attn_decode_combine_kernel(
    opart_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < NUM_SPLITS
    mask_dv = offs_dv < DV
    lse = tl.load(lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    mx = tl.max(lse, 0)  # finite: split 0 always holds meta tokens
    w = tl.exp2(lse - mx)
    o = tl.load(opart_ptr + b.to(tl.int64) * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                + offs_dv[None, :], mask=mask_s[:, None] & mask_dv[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * DV + offs_dv, res.to(out_ptr.dtype.element_ty),
             mask=mask_dv)


# Triton picks interpreter vs compiler when a kernel is decorated (module import), not per call.
_INTERPRETED = type(_attn_decode_kernel).__name__ == "InterpretedFunction"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_num_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Static choice (host ints only): split when B*nkv programs leave the GPU under-occupied."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    target = 4 * sms  # several resident programs per SM are needed to keep enough loads in flight
    if programs >= target:
        return 1
    by_len = max(1, max_keys // _MIN_KEYS_PER_SPLIT)
    return max(1, min(triton.cdiv(target, programs), by_len, _MAX_SPLITS))


def attention_decode_triton(q: torch.Tensor, meta_k: torch.Tensor, meta_v: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, slot_idx: torch.Tensor,
                            ctx_len: torch.Tensor, window: int | None,
                            block_table: torch.Tensor | None = None, *,
                            out: torch.Tensor | None = None, max_ctx: int | None = None, num_splits: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """Same contract as ``attention_decode_ref``: q [B, nh, d]; meta_k [M, nkv, d]; meta_v
    [M, nkv, dv]; ring cache [S, R, nkv, d|dv] (block_table None) or paged cache
    [num_blocks, bs, nkv, d|dv] with block_table [S, max_blocks]; slot_idx [B]; ctx_len [B] (real
    tokens incl. the current one, already written). Returns [B, nh*dv] in q.dtype.

    No host synchronisation: the split count is a function of B, nkv, the SM count and a static
    bound on keys per sequence. ``max_ctx`` (optional, a host int >= every ctx_len) tightens that
    bound; the CUDA-graph path passes the engine's static limit. When None the bound comes from
    shapes alone (ring: window + 1; paged: block_table.shape[1] * bs), still sync-free.
    ``out`` (optional, [B, nh*dv] in q.dtype, unit inner stride) is written in place and returned
    (preallocated CUDA-graph buffers). ``num_splits`` / ``block_n`` / ``num_warps`` / ``num_stages`` override the heuristics
    (tests, benchmarks).
    """
    B, nh, d = q.shape
    M, nkv, _ = meta_k.shape
    dv = meta_v.shape[-1]
    assert nh % nkv == 0, (nh, nkv)
    assert cache_k.shape[2] == nkv and cache_k.shape[3] == d and cache_v.shape[3] == dv
    assert meta_k.shape[2] == d and meta_v.shape[:2] == (M, nkv)
    for t in (cache_k, cache_v):  # never copy a cache: require a unit inner stride
        assert t.stride(-1) == 1, "cache head dim must be contiguous"
    q = q if q.stride(-1) == 1 else q.contiguous()
    meta_k = meta_k if meta_k.stride(-1) == 1 else meta_k.contiguous()
    meta_v = meta_v if meta_v.stride(-1) == 1 else meta_v.contiguous()
    group = nh // nkv
    if out is None:
        out = torch.empty(B, nh * dv, dtype=q.dtype, device=q.device)
    assert out.shape == (B, nh * dv) and out.dtype == q.dtype and out.stride(-1) == 1
    if B == 0:
        return out

    paged = block_table is not None
    if paged:
        page = cache_k.shape[1]
        bound = block_table.shape[1] * page
        R = 1
        bt = block_table
        stride_bt0, stride_bt1 = bt.stride(0), bt.stride(1)
    else:
        page = 1
        R = cache_k.shape[1]
        bound = R
        bt = slot_idx  # unused dummy pointer
        stride_bt0 = stride_bt1 = 0
    if window is not None:
        bound = min(bound, window + 1)
    if max_ctx is not None:
        bound = min(bound, max_ctx)
    max_keys = M + max(bound, 0)

    lowp = q.dtype in (torch.bfloat16, torch.float16) and cache_k.dtype == q.dtype \
        and cache_v.dtype == q.dtype and meta_k.dtype == q.dtype and meta_v.dtype == q.dtype
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_DV = max(16, triton.next_power_of_2(dv))
    GROUP_P = max(16, triton.next_power_of_2(group))
    BLOCK_N = block_n or (64 if BLOCK_DV <= 128 else 32)
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    splits = num_splits or _pick_num_splits(B * nkv, max_keys, q.device)
    splits = max(1, min(splits, triton.cdiv(max_keys, BLOCK_N)))

    if splits > 1:
        opart = torch.empty(B, nh, splits, dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, nh, splits, dtype=torch.float32, device=q.device)
        sp = (opart.stride(0), opart.stride(1), opart.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    else:
        opart = lse = out  # unused
        sp, sl = (0, 0, 0), (0, 0)

    qk_scale = _LOG2E / math.sqrt(d)
    _attn_decode_kernel[(B, nkv, splits)](
        q, meta_k, meta_v, cache_k, cache_v, slot_idx, ctx_len, bt,
        out, opart, lse,
        M, R, window if window is not None else 0, qk_scale,
        q.stride(0), q.stride(1),
        meta_k.stride(0), meta_k.stride(1), meta_v.stride(0), meta_v.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        stride_bt0, stride_bt1,
        out.stride(0),
        *sp, *sl,
        GROUP=group, GROUP_P=GROUP_P, D=d, DV=dv, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        BLOCK_N=BLOCK_N, NUM_SPLITS=splits, PAGED=paged, PAGE=page,
        HAS_WINDOW=window is not None, LOWP=lowp,
        EMULATE=_INTERPRETED,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _attn_decode_combine_kernel[(B, nh)](
            opart, lse, out, *sp, *sl, out.stride(0),
            DV=dv, BLOCK_DV=BLOCK_DV, NUM_SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out
