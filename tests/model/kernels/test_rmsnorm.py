"""rmsnorm and rmsnorm_avg fast paths (Triton) == their refs, under the interpreter (CPU) and
compiled (gpu)."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import assert_close, randn, run_fast, run_ref

from hymba_batch.model.kernels import rmsnorm

DTYPES = [torch.float32, torch.bfloat16]


def check_rmsnorm(device: str, dtype: torch.dtype, shape: tuple[int, ...], w_dtype: torch.dtype,
                  sliced: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    if sliced:  # rows of a wider tensor (e.g. the dt slice of the x_proj output)
        x = randn((*shape[:-1], D + 32), gen, device, dtype, scale=3.0)[..., 7:7 + D]
    else:
        x = randn(shape, gen, device, dtype, scale=3.0)
    w = randn((D,), gen, device, w_dtype, shift=1.0, scale=0.5)
    eps = 1e-6
    fast = run_fast(rmsnorm.rmsnorm, x, x, w, eps)
    ref = run_ref(rmsnorm.rmsnorm, x, w, eps)
    assert_close(fast, ref, dtype, "rmsnorm")
    if dtype != torch.float32:
        # Same rounding points as the ref (normalised row rounded, then the product rounded):
        # at most rare 1-ulp flips from a last-bit difference in the fp32 statistics. Skipping the
        # intermediate rounding changes ~10% of the elements, under the tolerance above.
        frac = (fast != ref).float().mean().item()
        assert frac < 0.01, f"{frac:.2%} of the elements differ from the ref"


def check_rmsnorm_avg(device: str, dtype: torch.dtype, M: int, D: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = randn((M, D), gen, device, dtype, scale=3.0)
    b = randn((M, D + 24), gen, device, dtype, scale=0.2)[:, 5:5 + D]  # a column slice, other scale
    wa = randn((D,), gen, device, dtype, shift=1.0, scale=0.5)
    wb = randn((D,), gen, device, dtype, shift=1.0, scale=0.5)
    fast = run_fast(rmsnorm.rmsnorm_avg, a, a, wa, b, wb, 1e-6)
    ref = run_ref(rmsnorm.rmsnorm_avg, a, wa, b, wb, 1e-6)
    assert_close(fast, ref, dtype, "rmsnorm_avg")
    if dtype != torch.float32:  # the ref's roundings (each norm, the sum, the half): rare 1-ulp flips
        frac = (fast != ref).float().mean().item()
        assert frac < 0.01, f"{frac:.2%} of the elements differ from the ref"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D", [(5, 48), (3, 200)])
def test_rmsnorm_avg_interpreter(kernel_device, dtype, M, D):
    check_rmsnorm_avg(kernel_device, dtype, M, D, seed=M + D)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_avg_gpu(kernel_device, dtype):
    check_rmsnorm_avg(kernel_device, dtype, 8192, 3200, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,sliced", [((7, 16), False), ((3, 5, 100), False), ((9, 48), True),
                                          ((2, 200), False)])
def test_rmsnorm_interpreter(kernel_device, dtype, shape, sliced):
    check_rmsnorm(kernel_device, dtype, shape, dtype, sliced, seed=hash((shape, str(dtype))) % 1000)


def test_rmsnorm_interpreter_fp32_weight_bf16_input(kernel_device):
    # the weight is rounded to the activation dtype before the product, like the ref
    check_rmsnorm(kernel_device, torch.bfloat16, (5, 64), torch.float32, False, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 100, 1600, 3200])
def test_rmsnorm_gpu(kernel_device, dtype, D):
    check_rmsnorm(kernel_device, dtype, (8192, D), dtype, sliced=(D == 100), seed=D)
    check_rmsnorm(kernel_device, dtype, (4, 3, D), dtype, sliced=False, seed=D + 1)
