"""apply_rope fast path (Triton) against apply_rope_ref on column slices of a wider projection as in
the model, under the interpreter (CPU) and compiled (gpu). The kernel rounds once where the ref
rounds each product and the sum: in fp32 the two agree to 1e-6; in bf16 the kernel is within one
ulp of the exact rotation (the ref's formula in fp64 on the same inputs, rounded once) and equal
to its rounding in at least 99% of elements."""

from __future__ import annotations

import pytest
import torch
from kernel_testutil import assert_within_ulp, column_slice, randn, run_fast, run_ref

from hymba_batch.model.config import HymbaConfig, real_config_dict
from hymba_batch.model.hymba import rope_cos_sin
from hymba_batch.model.kernels import rope

DTYPES = [torch.float32, torch.bfloat16]


def check_rope(device: str, dtype: torch.dtype, T: int, H: int, d: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = column_slice(randn((T, H * d), gen, device, dtype, scale=2.0), 40, gen).view(T, H, d)
    cfg = HymbaConfig.from_dict(real_config_dict())
    if d == cfg.head_dim:  # the model's angles at random positions
        cos, sin = rope_cos_sin(cfg, torch.randint(0, 9000, (T,), generator=gen).to(device), dtype)
    else:
        cos, sin = randn((T, d), gen, device, dtype), randn((T, d), gen, device, dtype)
    fast = run_fast(rope.apply_rope, x, x, cos, sin)
    assert fast.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(fast, run_ref(rope.apply_rope, x, cos, sin), atol=1e-6, rtol=1e-6)
        return
    exact = rope.apply_rope_ref(x.double(), cos.double(), sin.double()).to(dtype)  # rounded once
    assert_within_ulp(fast, exact, "rope vs the exact rotation", min_equal=0.99)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H,d", [(5, 3, 64), (11, 2, 16), (1, 5, 8)])
def test_rope_interpreter(kernel_device, dtype, T, H, d):
    check_rope(kernel_device, dtype, T, H, d, seed=T * H + d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [25, 5])
def test_rope_gpu(kernel_device, dtype, H):
    check_rope(kernel_device, dtype, 16384, H, 64, seed=H)
