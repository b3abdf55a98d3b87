"""Triton depthwise causal conv1d + SiLU over packed sequences, and its single-step update; the
fast twins of ``conv.causal_conv1d_varlen_ref`` / ``conv.causal_conv1d_update_ref``.

Varlen (prefill) is two launches, no host sync:
  1. ``_conv_varlen_fwd``: a grid over (token block, channel block) of the packed ``[T, C]``
     input. Each token finds its sequence by a binary search in ``cu_seqlens`` (so the work is
     balanced whatever the lengths); a tap that falls before its sequence's first token reads
     the history column from ``state[slot]`` (only token blocks that hold some sequence's first
     K-1 tokens take that branch). fp32 accumulate, SiLU, store in x.dtype.
  2. ``_conv_state_writeback``: a grid over (sequence, channel block) writes the last ``K-1``
     inputs of each non-empty sequence (older history included when it is shorter than ``K-1``)
     into its slot. It runs after (1) because (1) reads the old history.
Loads and stores are contiguous along the channel dim (the x/out row stride is free, so x may be
a column slice of a wider projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_seqs"])
def _conv_varlen_fwd(x_ptr, w_ptr, b_ptr, out_ptr, cu_ptr, slot_ptr, state_ptr,
                     T, C, n_seqs,
                     stride_xt, stride_wc, stride_wk, stride_ot,
                     stride_ss, stride_sc, stride_sk,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask_c = offs_c < C

    # Sequence of each token: the largest b in [0, n_seqs) with cu[b] <= t.
    seq = tl.zeros([BLOCK_T], dtype=tl.int32)
    size = n_seqs
    while size > 1:
        half = size // 2
        mid = seq + half
        start_mid = tl.load(cu_ptr + mid)
        seq = tl.where(start_mid <= offs_t, mid, seq)
        size -= half
    start = tl.load(cu_ptr + seq)
    t_rel = offs_t - start                                         # position inside the sequence

    x_dtype = x_ptr.dtype.element_ty
    tt = offs_t.to(tl.int64)
    x_ptrs = x_ptr + tt[:, None] * stride_xt + offs_c[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # Tap j multiplies input position t_rel - (K-1) + j of the sequence: from x when >= 0 ...
    for j in tl.static_range(K):
        in_seq = t_rel >= (K - 1) - j
        xv = tl.load(x_ptrs + (j - (K - 1)) * stride_xt,
                     mask=(mask_t & in_seq)[:, None] & mask_c[None, :], other=0.0)
        wj = tl.load(w_ptr + offs_c * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wj[None, :]
    # ... else from the slot's history, column pos + K-1 (only blocks holding a sequence's first
    # K-1 tokens, so the common path has no state addressing at all).
    if tl.min(tl.where(mask_t, t_rel, K)) < K - 1:
        slot = tl.load(slot_ptr + seq, mask=mask_t, other=0).to(tl.int64)
        s_ptrs = state_ptr + slot[:, None] * stride_ss + offs_c[None, :] * stride_sc
        for j in tl.static_range(K - 1):
            pos = t_rel - (K - 1) + j
            sv = tl.load(s_ptrs + (pos + (K - 1))[:, None] * stride_sk,
                         mask=(mask_t & (pos < 0))[:, None] & mask_c[None, :], other=0.0)
            wj = tl.load(w_ptr + offs_c * stride_wc + j * stride_wk, mask=mask_c,
                         other=0.0).to(tl.float32)
            acc += sv.to(x_dtype).to(tl.float32) * wj[None, :]
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + tt[:, None] * stride_ot + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _conv_state_writeback(x_ptr, cu_ptr, slot_ptr, state_ptr, C,
                          stride_xt, stride_ss, stride_sc, stride_sk,
                          K: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.load(cu_ptr + b)
    L = tl.load(cu_ptr + b + 1) - start
    slot = tl.load(slot_ptr + b).to(tl.int64)
    x_dtype = x_ptr.dtype.element_ty
    st = state_ptr + slot * stride_ss + offs_c * stride_sc
    # History xs = [old state (K-1 columns) | the sequence's L inputs]; new column i = xs[L + i].
    # Column L+i (> i once L >= 1) is read before column L+i is overwritten (ascending i, same
    # thread per channel), so the in-place update needs no barrier. Empty sequences are left alone.
    for i in tl.static_range(K - 1):
        p = L + i
        from_x = p >= K - 1
        # (masks as `offs < limit`: the Triton 3.9 interpreter mis-broadcasts scalar booleans)
        xv = tl.load(x_ptr + (start + p - (K - 1)).to(tl.int64) * stride_xt + offs_c,
                     mask=offs_c < tl.where(from_x, C, 0), other=0.0)
        sv = tl.load(st + p * stride_sk, mask=offs_c < tl.where(from_x, 0, C), other=0.0)
        v = tl.where(from_x, xv, sv.to(x_dtype))
        tl.store(st + i * stride_sk, v.to(state_ptr.dtype.element_ty),
                 mask=offs_c < tl.where(L > 0, C, 0))


@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, b_ptr, out_ptr, slot_ptr, state_ptr, C,
                        stride_xb, stride_wc, stride_wk, stride_ob,
                        stride_ss, stride_sc, stride_sk,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    slot = tl.load(slot_ptr + b).to(tl.int64)
    x_dtype = x_ptr.dtype.element_ty
    st = state_ptr + slot * stride_ss + offs_c * stride_sc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    # Tap j reads state column j (j < K-1) or the new input (j = K-1) and, for j >= 1, shifts it
    # into column j-1 (column j-1 was read one tap earlier by the same thread).
    for j in tl.static_range(K):
        if j < K - 1:
            v = tl.load(st + j * stride_sk, mask=mask_c, other=0.0).to(x_dtype)
        else:
            v = tl.load(x_ptr + b.to(tl.int64) * stride_xb + offs_c, mask=mask_c, other=0.0)
        wj = tl.load(w_ptr + offs_c * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        acc += v.to(tl.float32) * wj
        if j >= 1:
            tl.store(st + (j - 1) * stride_sk, v.to(state_ptr.dtype.element_ty), mask=mask_c)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


# Launch parameters; the benchmark (jobs/bench/kernels.py) overrides them to compare variants.
CONV_CONFIG = {"BLOCK_T": 32, "BLOCK_C": 256, "num_warps": 4}   # H200, 64x1024 bf16: 0.48 ms
WRITEBACK_CONFIG = {"BLOCK_C": 256, "num_warps": 2}
UPDATE_CONFIG = {"BLOCK_C": 128, "num_warps": 4}


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> int:
    C, K = weight.shape
    if x.shape[-1] != C or state.shape[1] != C or state.shape[2] != K - 1:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"state {tuple(state.shape)}")
    if K < 2:
        raise ValueError("causal conv needs K >= 2")
    return K


def causal_conv1d_varlen_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                cu_seqlens: torch.Tensor, state: torch.Tensor,
                                slot_idx: torch.Tensor) -> torch.Tensor:
    """x [T, C] packed (row stride free); weight [C, K]; bias [C] or None; cu_seqlens [B+1];
    state [S, C, K-1] (history read, then overwritten in place); slot_idx [B] (int32/int64).
    Returns SiLU(conv) [T, C] in x.dtype."""
    K = _check(x, weight, state)
    x = _rows(x)
    T, C = x.shape
    n_seqs = cu_seqlens.shape[0] - 1
    out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if n_seqs <= 0 or C == 0:
        return out
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
    slot_idx = slot_idx.to(device=x.device)
    has_bias = bias is not None
    b_arg = bias if has_bias else weight
    if T > 0:
        cfg = CONV_CONFIG
        grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"]))
        _conv_varlen_fwd[grid](
            x, weight, b_arg, out, cu, slot_idx, state, T, C, n_seqs,
            x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
            state.stride(0), state.stride(1), state.stride(2),
            K=K, HAS_BIAS=has_bias, BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"],
            num_warps=cfg["num_warps"])
    cfg = WRITEBACK_CONFIG
    _conv_state_writeback[(n_seqs, triton.cdiv(C, cfg["BLOCK_C"]))](
        x, cu, slot_idx, state, C, x.stride(0), state.stride(0), state.stride(1), state.stride(2),
        K=K, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out


def causal_conv1d_update_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                state: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
    """One new token per sequence: x [B, C]; state [S, C, K-1] shifted in place; -> [B, C]."""
    K = _check(x, weight, state)
    x = _rows(x)
    Bn, C = x.shape
    out = torch.empty((Bn, C), dtype=x.dtype, device=x.device)
    if Bn == 0 or C == 0:
        return out
    slot_idx = slot_idx.to(device=x.device)
    has_bias = bias is not None
    cfg = UPDATE_CONFIG
    _conv_update_kernel[(Bn, triton.cdiv(C, cfg["BLOCK_C"]))](
        x, weight, bias if has_bias else weight, out, slot_idx, state, C,
        x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        state.stride(0), state.stride(1), state.stride(2),
        K=K, HAS_BIAS=has_bias, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out
