"""causal_conv1d_varlen / causal_conv1d_update fast paths (Triton) == their refs, including the
state pools (written slots equal the ref's, NaN-filled unused slots untouched)."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import (assert_close, assert_same, column_slice, cu_seqlens, pick_slots, randn,
                             random_lengths, run_fast, run_ref, state_pool)

from hymba_batch.model.kernels import conv

DTYPES = [torch.float32, torch.bfloat16]


def check_conv_varlen(device, dtype, lengths, C, K, pool, seed, bias=True, state_dtype=None,
                      slot_dtype=torch.int64, sliced=True):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype
    cu = cu_seqlens(lengths, device)
    T = int(sum(lengths))
    x = randn((T, C), gen, device, dtype)
    if sliced:  # s is a column slice of the in_proj output in the model
        x = column_slice(x, 40, gen)
    w = randn((C, K), gen, device, dtype, scale=0.5)
    b = randn((C,), gen, device, dtype, scale=0.1) if bias else None
    slots = pick_slots(len(lengths), pool, gen, device, slot_dtype)
    st0 = state_pool(pool, (C, K - 1), slots, state_dtype, gen, device)
    st_fast, st_ref = st0.clone(), st0.clone()
    out_fast = run_fast(conv.causal_conv1d_varlen, x, x, w, b, cu, st_fast, slots)
    out_ref = run_ref(conv.causal_conv1d_varlen, x, w, b, cu, st_ref, slots)
    assert_close(out_fast, out_ref, dtype, "conv out")
    assert_same(st_fast, st_ref, "conv state pool")  # copies of inputs: exact
    # the ref really changed the used slots (the comparison above is not vacuous)
    changed = ~torch.isclose(st_ref.float(), st0.float(), equal_nan=True)
    assert changed[slots.long()].any()


def check_conv_update(device, dtype, Bn, C, K, pool, seed, bias=True, slot_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    x = randn((Bn, C), gen, device, dtype)
    w = randn((C, K), gen, device, dtype, scale=0.5)
    b = randn((C,), gen, device, dtype, scale=0.1) if bias else None
    slots = pick_slots(Bn, pool, gen, device, slot_dtype)
    st0 = state_pool(pool, (C, K - 1), slots, dtype, gen, device)
    st_fast, st_ref = st0.clone(), st0.clone()
    out_fast = run_fast(conv.causal_conv1d_update, x, x, w, b, st_fast, slots)
    out_ref = run_ref(conv.causal_conv1d_update, x, w, b, st_ref, slots)
    assert_close(out_fast, out_ref, dtype, "conv update out")
    assert_same(st_fast, st_ref, "conv update state pool")


# ---------------------------------------------------------------- CPU, Triton interpreter

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1, 3, 17], [2, 1, 1, 9, 4], [40]], ids=str)
def test_conv_varlen_interpreter(kernel_device, dtype, lengths):
    check_conv_varlen(kernel_device, dtype, lengths, C=48, K=4, pool=7, seed=len(lengths))


@pytest.mark.parametrize("K", [2, 3])
def test_conv_varlen_interpreter_other_widths_no_bias(kernel_device, K):
    check_conv_varlen(kernel_device, torch.float32, [1, 2, 6], C=32, K=K, pool=5, seed=K,
                      bias=False, slot_dtype=torch.int32)


def test_conv_varlen_interpreter_fp32_state_bf16_input(kernel_device):
    # the history is rounded to x.dtype before use, and written back from x.dtype values
    check_conv_varlen(kernel_device, torch.bfloat16, [2, 5], C=40, K=4, pool=4, seed=11,
                      state_dtype=torch.float32, sliced=False)


def test_conv_varlen_interpreter_empty_sequence(kernel_device):
    # a zero-length sequence leaves its slot untouched (the ref skips it); an fp32 pool under bf16
    # inputs would show a rewrite (rounded to bf16)
    check_conv_varlen(kernel_device, torch.bfloat16, [3, 0, 2], C=32, K=4, pool=4, seed=5,
                      state_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_update_interpreter(kernel_device, dtype):
    check_conv_update(kernel_device, dtype, Bn=5, C=48, K=4, pool=9, seed=1)


def test_conv_update_interpreter_no_bias_int32_slots(kernel_device):
    check_conv_update(kernel_device, torch.float32, Bn=3, C=32, K=3, pool=3, seed=2, bias=False,
                      slot_dtype=torch.int32)


# ---------------------------------------------------------------- GPU, compiled

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_varlen_gpu(kernel_device, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = random_lengths(64, 2048, gen)
    check_conv_varlen(kernel_device, dtype, lengths, C=3200, K=4, pool=96, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_varlen_gpu_many_short(kernel_device, dtype):
    gen = torch.Generator().manual_seed(1)
    lengths = random_lengths(1024, 4, gen)  # shorter than the history: old state carried over
    check_conv_varlen(kernel_device, dtype, lengths, C=3200, K=4, pool=1500, seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_update_gpu(kernel_device, dtype):
    check_conv_update(kernel_device, dtype, Bn=1024, C=3200, K=4, pool=1536, seed=3)
