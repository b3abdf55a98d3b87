"""selective_scan_varlen / selective_state_update fast paths (Triton) == their refs, including the
state pools in fp32 and in bf16, the engine's default for a bf16 model (written slots equal the
ref's, NaN-filled unused slots untouched)."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import (assert_close, column_slice, cu_seqlens, pick_slots, randn,
                             random_lengths, run_fast, run_ref, state_pool)

from hymba_batch.model.kernels import scan

DTYPES = [torch.float32, torch.bfloat16]


def scan_inputs(T, E, N, dtype, gen, device, sliced):
    """Value ranges like the model's: dt = softplus(r + b_dt) with b_dt = softplus^-1 of
    [1e-3, 0.1]; A = -[1..N] (S4D-real init) with noise; unit B, C; a few delta values beyond the
    softplus threshold (20) and far below zero."""
    u = randn((T, E), gen, device, dtype, scale=0.7)
    delta = torch.randn((T, E), generator=gen) * 0.5
    if T * E >= 8:
        flat = delta.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:max(2, flat.numel() // 50)]
        flat[idx[0::2]] = 30.0
        flat[idx[1::2]] = -30.0
    delta = delta.to(device=device, dtype=dtype)
    z = randn((T, E), gen, device, dtype)
    if sliced:  # z is a column slice of the in_proj output in the model
        z = column_slice(z, 24, gen)
    A = (-(torch.arange(1, N + 1, dtype=torch.float32)[None, :].expand(E, N))
         * torch.exp(torch.randn((E, N), generator=gen) * 0.1)).to(device)
    B = randn((T, N), gen, device, dtype)
    C = randn((T, N), gen, device, dtype)
    D = randn((E,), gen, device, dtype, shift=1.0, scale=0.1)
    lo, hi = torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(0.1))
    dt_init = torch.exp(torch.rand(E, generator=gen) * (hi - lo) + lo)
    delta_bias = (dt_init + torch.log(-torch.expm1(-dt_init))).to(device=device, dtype=dtype)
    return u, delta, A, B, C, D, z, delta_bias


def check_scan_varlen(device, dtype, lengths, E, N, pool, seed, slot_dtype=torch.int64, sliced=True,
                      state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cu = cu_seqlens(lengths, device)
    T = int(sum(lengths))
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(T, E, N, dtype, gen, device, sliced)
    slots = pick_slots(len(lengths), pool, gen, device, slot_dtype)
    st0 = state_pool(pool, (E, N), slots, state_dtype, gen, device, scale=0.5)
    st_fast, st_ref = st0.clone(), st0.clone()
    args = (u, delta, A, B, C, D, z, delta_bias, cu)
    y_fast = run_fast(scan.selective_scan_varlen, u, *args, st_fast, slots)
    y_ref = run_ref(scan.selective_scan_varlen, *args, st_ref, slots)
    assert_close(y_fast, y_ref, dtype, "scan y")
    # the state is stored at its own dtype whatever the activations': compare it at that tolerance
    assert st_fast.dtype == state_dtype
    assert_close(st_fast, st_ref, state_dtype, "scan state pool")
    assert not torch.allclose(st_ref[slots.long()], st0[slots.long()])


def check_state_update(device, dtype, Bn, E, N, pool, seed, slot_dtype=torch.int64,
                       state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(Bn, E, N, dtype, gen, device, sliced=False)
    slots = pick_slots(Bn, pool, gen, device, slot_dtype)
    st0 = state_pool(pool, (E, N), slots, state_dtype, gen, device, scale=0.5)
    st_fast, st_ref = st0.clone(), st0.clone()
    args = (u, delta, A, B, C, D, z, delta_bias)
    y_fast = run_fast(scan.selective_state_update, u, st_fast, slots, *args)
    y_ref = run_ref(scan.selective_state_update, st_ref, slots, *args)
    assert_close(y_fast, y_ref, dtype, "state update y")
    assert st_fast.dtype == state_dtype
    assert_close(st_fast, st_ref, state_dtype, "state update pool")


# ---------------------------------------------------------------- CPU, Triton interpreter

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths,E,N", [([1, 3, 17], 48, 16), ([2, 1, 9, 4, 1], 32, 4),
                                         ([13], 64, 8)], ids=str)
def test_scan_varlen_interpreter(kernel_device, dtype, lengths, E, N):
    check_scan_varlen(kernel_device, dtype, lengths, E, N, pool=8, seed=sum(lengths) + E)


def test_scan_varlen_interpreter_odd_state_int32_slots(kernel_device):
    # N not a power of two (masked state lanes), int32 slot ids, unsliced inputs
    check_scan_varlen(kernel_device, torch.float32, [5, 2], E=40, N=12, pool=3, seed=7,
                      slot_dtype=torch.int32, sliced=False)


@pytest.mark.parametrize("cfg", [{"UNROLL4": False}, {"BLOCK_E": 64, "num_warps": 2}, {"BLOCK_E": 16}], ids=str)
def test_scan_varlen_interpreter_launch_configs(kernel_device, monkeypatch, cfg):
    # the plain-loop variant; a channel block wider than E (masked lanes), as on the GPU
    from hymba_batch.model.kernels import _scan_triton
    for k, v in cfg.items():
        monkeypatch.setitem(_scan_triton.SCAN_CONFIG, k, v)
    check_scan_varlen(kernel_device, torch.float32, [1, 6, 3], E=48, N=16, pool=4, seed=8)


def test_scan_varlen_interpreter_bf16_state(kernel_device):
    # the engine's default pool for a bf16 model: read into fp32, rounded back at the end
    check_scan_varlen(kernel_device, torch.bfloat16, [3, 11, 1], E=48, N=16, pool=5, seed=10,
                      state_dtype=torch.bfloat16)


def test_state_update_interpreter_bf16_state(kernel_device):
    check_state_update(kernel_device, torch.bfloat16, Bn=4, E=48, N=16, pool=6, seed=11,
                       state_dtype=torch.bfloat16)


def test_scan_varlen_interpreter_empty_sequence(kernel_device):
    # a zero-length sequence leaves its slot untouched (the ref skips it)
    check_scan_varlen(kernel_device, torch.float32, [4, 0, 3], E=32, N=8, pool=4, seed=9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,N", [(48, 16), (64, 4)], ids=str)
def test_state_update_interpreter(kernel_device, dtype, E, N):
    check_state_update(kernel_device, dtype, Bn=5, E=E, N=N, pool=9, seed=E + N)


def test_state_update_interpreter_int32_slots(kernel_device):
    check_state_update(kernel_device, torch.float32, Bn=3, E=40, N=12, pool=3, seed=4,
                       slot_dtype=torch.int32)


# ---------------------------------------------------------------- GPU, compiled

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan_varlen_gpu(kernel_device, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = random_lengths(64, 2048, gen)
    # the state pool in the activations' dtype, as the engine keeps it by default
    check_scan_varlen(kernel_device, dtype, lengths, E=3200, N=16, pool=96, seed=1, state_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"BLOCK_E": 64}, {"BLOCK_E": 16}, {"UNROLL4": False},
                                 {"BLOCK_E": 64, "num_warps": 2}], ids=str)
def test_scan_varlen_gpu_launch_configs(kernel_device, monkeypatch, cfg):
    # the launch configs the kernels bench sweeps, compiled (32 sequences: a default prefill step's)
    from hymba_batch.model.kernels import _scan_triton
    for k, v in cfg.items():
        monkeypatch.setitem(_scan_triton.SCAN_CONFIG, k, v)
    lengths = random_lengths(32, 1024, torch.Generator().manual_seed(4))
    check_scan_varlen(kernel_device, torch.bfloat16, lengths, E=3200, N=16, pool=40, seed=5, state_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_scan_varlen_gpu_many_short(kernel_device):
    gen = torch.Generator().manual_seed(2)
    lengths = random_lengths(512, 5, gen)
    check_scan_varlen(kernel_device, torch.bfloat16, lengths, E=3200, N=16, pool=600, seed=3)  # fp32 pool


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_update_gpu(kernel_device, dtype):
    check_state_update(kernel_device, dtype, Bn=1024, E=3200, N=16, pool=1536, seed=5, state_dtype=dtype)
