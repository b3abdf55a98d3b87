"""Packed varlen prefill attention over the engine's ring / paged KV caches (Triton twin of
``attention_prefill_ref``).

Owns the prefill kernel and its launcher. One engine prefill step packs B sequences' chunks:
sequence b owns query rows [cu[b], cu[b+1]) and its chunk row i is real position
p = start[b] + i. A query sees every meta key, plus the real tokens m <= p of its own sequence with
p - m <= window (window None: no limit); tokens m < start[b] come from the cache, tokens
m >= start[b] from the packed k / v of this step (the chunk is not in the cache yet).

Grid (query tile, sequence b, KV head g [x split]). GQA is packed into the tile: the GROUP query
heads that share KV head g are flattened with the chunk rows, so tile row r is the pair
j = qb * BLOCK_Q + r -> (chunk row i = j // GROUP, head g * GROUP + j % GROUP). Every tl.dot is
[BLOCK_Q, d] x [d, BLOCK_N] and only the sequence's last tile has padding (GROUP = 5 needs no
padding to a power of two). Tiles past a sequence's chunk exit at once; the grid's first axis is
walked from the last tile down so the longest causal rows start first.

A tile's rows are positions [p_lo, p_hi]; it walks, in BLOCK_N blocks, only the keys some row can
see, and masks only where some row may not see a key:

  meta       [0, M)                           read in place from [M, nkv, d]; no mask
  history    [k_lo, start)                    from the cache; k_lo = max(0, p_lo - window)
             masked below f_lo = p_hi - window (the window edge), unmasked above
  chunk      [max(start, k_lo), p_hi + 1)     from the packed k / v
             unmasked on [f_lo, p_lo] (seen by every row), masked on both sides of it

Cache addressing is the decode kernel's: ring (block_table None) cache[slot, m % R], paged
cache[block_table[slot, m // bs], m % bs]. Softmax is the decode kernel's online softmax in base 2
with fp32 scores and accumulator (fp32 inputs: IEEE dots; bf16/fp16: tensor-core dots, P rounded
to the V dtype for P @ V). ``EMULATE`` runs bf16 dots as fp32 dots of the same values under the
Triton interpreter, whose bf16 dot is wrong.

Split-KV: when the tiles cannot fill the GPU (a few short chunks over long histories), each tile's
history range is cut into ``num_splits`` parts run by separate programs; the last part also takes
the meta and chunk keys (so it never ends empty). Partial outputs and base-2 log-sum-exps go to an
fp32 scratch and the decode kernel's combine kernel merges them. The split count is chosen on the
host from host ints only (B, nkv, max_chunk, max_hist, the SM count), so the launcher never
synchronises with the device.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_decode_triton import _attn_decode_combine_kernel, _online_step, _sm_count

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 512  # below this a split's fixed cost (q tile load, partial write) dominates
_MAX_SPLITS = 16

# key sources of _attend (see its docstring)
_LINEAR = tl.constexpr(0)
_RING = tl.constexpr(1)
_PAGED = tl.constexpr(2)


@triton.jit
def _attend(q, m_i, l_i, acc, p_row, lo, hi, shift,
            k_base, v_base, stride_kn, stride_vn, stride_k0, stride_v0, outer, R, bt_row, stride_bt1,
            window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
            SRC: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGE: tl.constexpr,
            BLOCK_N: tl.constexpr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """Keys at positions [lo, hi) of one source, BLOCK_N at a time.

    SRC linear: row (m - shift) of a [rows, heads, dim] tensor (meta K/V, or this step's packed
    chunk K/V); ring: cache[outer, m % R]; paged: cache[bt_row[m // PAGE], m % PAGE]. k_base /
    v_base already point at the KV head. MASK applies causality and the window per query row
    (p_row [BQ]); without it only the range end is masked."""
    for n0 in range(lo, hi, BLOCK_N):
        m = n0 + offs_n
        inb = m < hi
        if SRC == _LINEAR:
            r = (m - shift).to(tl.int64)
            k_rows = k_base + r * stride_kn
            v_rows = v_base + r * stride_vn
        elif SRC == _RING:
            r = m % R
            k_rows = k_base + outer * stride_k0 + r * stride_kn
            v_rows = v_base + outer * stride_v0 + r * stride_vn
        else:
            blk = tl.load(bt_row + (m // PAGE) * stride_bt1, mask=inb, other=0).to(tl.int64)
            r = m % PAGE
            k_rows = k_base + blk * stride_k0 + r * stride_kn
            v_rows = v_base + blk * stride_v0 + r * stride_vn
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=inb[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_rows[:, None] + offs_dv[None, :], mask=inb[:, None] & mask_dv[None, :], other=0.0)
        if MASK:
            diff = p_row[:, None] - m[None, :]
            valid = inb[None, :] & (diff >= 0)
            if HAS_WINDOW:
                valid = valid & (diff <= window)
        else:
            valid = inb[None, :]
        m_i, l_i, acc = _online_step(q, k, v, valid, m_i, l_i, acc, qk_scale, LOWP, EMULATE)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_splits"])  # varies step to step: one compile for every count
def _attn_prefill_kernel(
    q_ptr, k_ptr, v_ptr, mk_ptr, mv_ptr, ck_ptr, cv_ptr, slot_ptr, start_ptr, cu_ptr, bt_ptr,
    out_ptr, opart_ptr, lse_ptr,
    M, R, window, qk_scale, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_mkm, stride_mkh, stride_mvm, stride_mvh,
    stride_ck0, stride_ck1, stride_ckh, stride_cv0, stride_cv1, stride_cvh,
    stride_bt0, stride_bt1,
    stride_ot,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HIST_SRC: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP: tl.constexpr,
    EMULATE: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    if SPLIT:
        g = tl.program_id(2) // num_splits
        sp = tl.program_id(2) % num_splits
    else:
        g = tl.program_id(2)

    cu_b = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - cu_b
    pair0 = qb * BLOCK_Q
    if pair0 >= n * GROUP:
        return
    start = tl.load(start_ptr + b).to(tl.int32)
    slot = tl.load(slot_ptr + b).to(tl.int64)

    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV

    pair = pair0 + offs_q
    row_ok = pair < n * GROUP
    i = tl.minimum(pair // GROUP, n - 1)  # padding pairs act as the last row; never stored
    head = g * GROUP + pair % GROUP
    trow = (cu_b + i).to(tl.int64)
    p_row = start + i
    q = tl.load(q_ptr + trow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_d[None, :], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)

    # key ranges of this tile (real positions); see the module docstring
    p_lo = start + pair0 // GROUP
    p_hi = start + tl.minimum((pair0 + BLOCK_Q - 1) // GROUP, n - 1)
    if HAS_WINDOW:
        k_lo = tl.maximum(p_lo - window, 0)
        f_lo = tl.maximum(p_hi - window, 0)
    else:
        k_lo = start * 0
        f_lo = start * 0
    f_hi = p_lo + 1
    hs = tl.minimum(start, f_lo)  # history below hs: some row's window excludes some key
    c_lo = tl.maximum(start, k_lo)
    if SPLIT:
        part = tl.cdiv(tl.cdiv(tl.maximum(start - k_lo, 0), num_splits), BLOCK_N) * BLOCK_N
        h_a = k_lo + sp * part
        h_b = tl.minimum(h_a + part, start)
        own = (sp == num_splits - 1).to(tl.int32)  # the last split also takes meta and chunk
        meta_hi = M * own
        c_hi = c_lo + (p_hi + 1 - c_lo) * own
    else:
        h_a = k_lo
        h_b = start
        meta_hi = M
        c_hi = p_hi + 1
    u_lo = tl.minimum(tl.maximum(c_lo, f_lo), c_hi)
    u_hi = tl.minimum(tl.maximum(u_lo, f_hi), c_hi)

    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # finite: an all-masked block stays NaN-free
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)

    # meta keys, shared by every sequence
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, 0, meta_hi, 0,
                            mk_ptr + g * stride_mkh, mv_ptr + g * stride_mvh, stride_mkm, stride_mvm,
                            0, 0, 0, 1, bt_ptr, 0, window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                            SRC=_LINEAR, MASK=False, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                            LOWP=LOWP, EMULATE=EMULATE)

    # history from the cache: the window edge (masked), then keys every row sees
    ck_head = ck_ptr + g * stride_ckh
    cv_head = cv_ptr + g * stride_cvh
    bt_row = bt_ptr + slot * stride_bt0
    # Without a window hs = 0 and this range is empty. Skip it statically: Triton 3.6 still
    # software-pipelines the empty loop, and for the paged source (3 stages, unsplit) the resulting
    # PTX crashes ptxas (SIGSEGV) at sm_90a.
    if HAS_WINDOW:
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, h_a, tl.minimum(h_b, hs), 0,
                                ck_head, cv_head, stride_ck1, stride_cv1, stride_ck0, stride_cv0, slot, R,
                                bt_row, stride_bt1, window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                                SRC=HIST_SRC, MASK=True, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                                LOWP=LOWP, EMULATE=EMULATE)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, tl.maximum(h_a, hs), h_b, 0,
                            ck_head, cv_head, stride_ck1, stride_cv1, stride_ck0, stride_cv0, slot, R,
                            bt_row, stride_bt1, window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                            SRC=HIST_SRC, MASK=False, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                            LOWP=LOWP, EMULATE=EMULATE)

    # this chunk's keys from the packed k / v: window edge, fully visible, causal edge
    k_head = k_ptr + g * stride_kh
    v_head = v_ptr + g * stride_vh
    shift = start - cu_b  # packed row of real position m: m - shift
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, c_lo, u_lo, shift,
                            k_head, v_head, stride_kt, stride_vt, 0, 0, 0, 1, bt_ptr, 0,
                            window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                            SRC=_LINEAR, MASK=True, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                            LOWP=LOWP, EMULATE=EMULATE)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, u_lo, u_hi, shift,
                            k_head, v_head, stride_kt, stride_vt, 0, 0, 0, 1, bt_ptr, 0,
                            window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                            SRC=_LINEAR, MASK=False, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                            LOWP=LOWP, EMULATE=EMULATE)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, p_row, u_hi, c_hi, shift,
                            k_head, v_head, stride_kt, stride_vt, 0, 0, 0, 1, bt_ptr, 0,
                            window, qk_scale, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                            SRC=_LINEAR, MASK=True, HAS_WINDOW=HAS_WINDOW, PAGE=PAGE, BLOCK_N=BLOCK_N,
                            LOWP=LOWP, EMULATE=EMULATE)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        pptrs = opart_ptr + trow[:, None] * stride_pt + head[:, None] * stride_ph + sp * stride_ps \
            + offs_dv[None, :]
        tl.store(pptrs, o, mask=row_ok[:, None] & mask_dv[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # -inf: empty split
        tl.store(lse_ptr + trow * stride_lt + head * stride_lh + sp, lse, mask=row_ok)
    else:
        optrs = out_ptr + trow[:, None] * stride_ot + head[:, None] * DV + offs_dv[None, :]
        tl.store(optrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_dv[None, :])


# Triton picks interpreter vs compiler when a kernel is decorated (module import), not per call.
_INTERPRETED = type(_attn_prefill_kernel).__name__ == "InterpretedFunction"


def _pick_num_splits(programs: int, max_hist: int, device: torch.device) -> int:
    """Static choice (host ints only): split the history when the tiles leave the GPU idle."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    target = 2 * sms  # large tiles: about two resident programs per SM
    if programs >= target:
        return 1
    by_len = max(1, max_hist // _MIN_KEYS_PER_SPLIT)
    return max(1, min(triton.cdiv(target, programs), by_len, _MAX_SPLITS))


def attention_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta_k: torch.Tensor,
                             meta_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                             slot_idx: torch.Tensor, start: torch.Tensor, cu: torch.Tensor,
                             window: int | None, block_table: torch.Tensor | None = None, *,
                             max_chunk: int, max_hist: int, out: torch.Tensor | None = None,
                             num_splits: int | None = None, block_q: int | None = None,
                             block_n: int | None = None, num_warps: int | None = None,
                             num_stages: int | None = None) -> torch.Tensor:
    """Same contract as ``attention_prefill_ref``: q [T, nh, d], k [T, nkv, d], v [T, nkv, dv]
    (packed; any row / head strides, unit inner stride); meta_k [M, nkv, d], meta_v [M, nkv, dv];
    ring cache [S, R, nkv, d|dv] (block_table None) or paged [num_blocks, bs, nkv, d|dv] with
    block_table [S, max_blocks]; slot_idx [B]; start [B] (tokens already cached); cu [B+1] int32
    with cu[0] = 0 and cu[B] = T. Returns [T, nh*dv] in q.dtype.

    Host ints, never read from the device: ``max_chunk`` >= every chunk length cu[b+1] - cu[b]
    (sizes the grid; a longer chunk would leave rows unwritten), ``max_hist`` >= the history any
    query of the step can see (min(start, window) with a window, start without; it only steers
    the split-KV choice). ``out`` (optional, [T, nh*dv] in q.dtype, unit inner stride) is written
    in place. ``num_splits`` / ``block_q`` / ``block_n`` / ``num_warps`` / ``num_stages`` override
    the heuristics (tests, benchmarks).
    """
    T, nh, d = q.shape
    M, nkv, _ = meta_k.shape
    dv = meta_v.shape[-1]
    B = slot_idx.shape[0]
    assert nh % nkv == 0, (nh, nkv)
    assert k.shape == (T, nkv, d) and v.shape == (T, nkv, dv), (k.shape, v.shape)
    assert cache_k.shape[2] == nkv and cache_k.shape[3] == d and cache_v.shape[3] == dv
    assert meta_k.shape[2] == d and meta_v.shape[:2] == (M, nkv)
    assert start.shape == (B,) and cu.shape == (B + 1,), (start.shape, cu.shape)
    for t in (cache_k, cache_v):  # never copy a cache: require a unit inner stride
        assert t.stride(-1) == 1, "cache head dim must be contiguous"
    q, k, v, meta_k, meta_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, meta_k, meta_v))
    group = nh // nkv
    if out is None:
        out = torch.empty(T, nh * dv, dtype=q.dtype, device=q.device)
    assert out.shape == (T, nh * dv) and out.dtype == q.dtype and out.stride(-1) == 1
    if T == 0 or B == 0 or max_chunk <= 0:
        return out

    paged = block_table is not None
    if paged:
        page, R = cache_k.shape[1], 1
        bt = block_table
        stride_bt0, stride_bt1 = bt.stride(0), bt.stride(1)
    else:
        page, R = 1, cache_k.shape[1]
        bt = slot_idx  # unused dummy pointer
        stride_bt0 = stride_bt1 = 0

    lowp = q.dtype in (torch.bfloat16, torch.float16) and all(
        t.dtype == q.dtype for t in (k, v, meta_k, meta_v, cache_k, cache_v))
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_DV = max(16, triton.next_power_of_2(dv))
    BLOCK_Q = block_q or (128 if lowp else 64)
    BLOCK_N = block_n or (64 if lowp and BLOCK_DV <= 128 else 32)
    if num_warps is None:
        num_warps = 8 if BLOCK_Q >= 128 else 4
    if num_stages is None:
        num_stages = 3 if lowp else 2
    q_tiles = triton.cdiv(max_chunk * group, BLOCK_Q)
    splits = num_splits or _pick_num_splits(q_tiles * B * nkv, max_hist, q.device)
    splits = max(1, min(splits, triton.cdiv(max(max_hist, 1), BLOCK_N)))

    if splits > 1:
        opart = torch.empty(T, nh, splits, dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(T, nh, splits, dtype=torch.float32, device=q.device)
        sp = (opart.stride(0), opart.stride(1), opart.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    else:
        opart = lse = out  # unused
        sp, sl = (0, 0, 0), (0, 0)

    _attn_prefill_kernel[(q_tiles, B, nkv * splits)](
        q, k, v, meta_k, meta_v, cache_k, cache_v, slot_idx, start, cu, bt,
        out, opart, lse,
        M, R, window if window is not None else 0, _LOG2E / math.sqrt(d), splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        meta_k.stride(0), meta_k.stride(1), meta_v.stride(0), meta_v.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        stride_bt0, stride_bt1,
        out.stride(0),
        *sp, *sl,
        GROUP=group, D=d, DV=dv, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N,
        SPLIT=splits > 1, HIST_SRC=(_PAGED if paged else _RING).value, PAGE=page,
        HAS_WINDOW=window is not None, LOWP=lowp,
        EMULATE=_INTERPRETED,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _attn_decode_combine_kernel[(T, nh)](
            opart, lse, out, *sp, *sl, out.stride(0),
            DV=dv, BLOCK_DV=BLOCK_DV, NUM_SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out
