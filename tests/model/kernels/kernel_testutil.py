"""Helpers shared by the kernel tests (inputs, state pools, poisoned outputs, comparisons)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from hymba_batch.model.kernels import backend


def cu_seqlens(lengths: Sequence[int], device: str) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def random_lengths(n: int, max_len: int, gen: torch.Generator) -> list[int]:
    return torch.randint(1, max_len + 1, (n,), generator=gen).tolist()


def pick_slots(n: int, pool: int, gen: torch.Generator, device: str,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """n distinct slots out of ``pool``, in random order."""
    return torch.randperm(pool, generator=gen)[:n].to(device=device, dtype=dtype)


def state_pool(pool: int, shape: Sequence[int], slots: torch.Tensor, dtype: torch.dtype,
               gen: torch.Generator, device: str, scale: float = 1.0) -> torch.Tensor:
    """A pool whose used slots hold random state and whose other slots hold NaN: a kernel that
    reads or writes a slot it should not shows up as a NaN or a changed NaN slot."""
    st = torch.full((pool, *shape), float("nan"), dtype=torch.float32)
    used = slots.cpu().long()
    st[used] = torch.randn((len(used), *shape), generator=gen) * scale
    return st.to(device=device, dtype=dtype)


def randn(shape: Sequence[int], gen: torch.Generator, device: str, dtype: torch.dtype,
          scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=gen) * scale + shift).to(device=device, dtype=dtype)


def column_slice(x: torch.Tensor, extra: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` as a column slice of a wider tensor (row stride > width), like the projections'
    q|k|v|s|z slices; the other columns are NaN."""
    T, C = x.shape
    wide = torch.full((T, C + extra), float("nan"), dtype=x.dtype, device=x.device)
    off = extra // 2
    wide[:, off:off + C] = x
    return wide[:, off:off + C]


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Inside the block ``torch.empty`` returns NaN-filled floating tensors, so an output element a
    kernel never writes stays NaN."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = orig


def run_fast(fn, probe: torch.Tensor, *args):
    """Call a dispatcher on the fast path (asserting it is taken), with poisoned outputs."""
    with backend.force("fast"):
        assert backend.use_fast(probe), "fast path not selected (no CUDA and no TRITON_INTERPRET=1?)"
        with poisoned_empty():
            return fn(*args)


def run_ref(fn, *args):
    with backend.force("ref"):
        return fn(*args)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)


def assert_same(fast: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-for-bit equal, NaN where the ref has NaN (copies such as the conv history)."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, (what, fast.shape, ref.shape)
    same = (fast == ref) | (fast.isnan() & ref.isnan())
    assert same.all(), f"{what}: {int((~same).sum())}/{ref.numel()} elements differ"


def assert_within_ulp(fast: torch.Tensor, ref: torch.Tensor, what: str, min_equal: float = 0.99) -> None:
    """Every element within one unit in the last place of ``ref`` (its dtype's), and at least
    ``min_equal`` of them bit-for-bit equal: the same roundings, except where a compiler rounds a
    sum once that the ref rounds twice."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, (what, fast.shape, ref.shape)
    f, r = fast.double(), ref.double()
    fi = torch.finfo(ref.dtype)
    ulp = fi.eps * torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(fi.tiny))))
    err = (f - r).abs()
    bad = err > ulp
    assert not bad.any(), f"{what}: {int(bad.sum())}/{r.numel()} elements more than 1 ulp off"
    equal = (f == r).double().mean().item()
    assert equal >= min_equal, f"{what}: only {equal:.4%} of elements bit-for-bit equal"


def assert_close(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise |fast - ref| <= atol * scale + rtol * |ref| with scale = max(1, max |ref|);
    NaN must match NaN exactly (poisoned outputs, NaN pool slots)."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, (what, fast.shape, ref.shape)
    rtol, atol = tolerances(dtype)
    f, r = fast.float(), ref.float()
    nan_f, nan_r = f.isnan(), r.isnan()
    assert torch.equal(nan_f, nan_r), f"{what}: {int((nan_f != nan_r).sum())} NaN mismatches " \
                                      f"(unwritten outputs or touched slots)"
    f, r = f[~nan_r], r[~nan_r]
    if r.numel() == 0:
        return
    scale = max(1.0, r.abs().max().item())
    err = (f - r).abs()
    bound = atol * scale + rtol * r.abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{r.numel()} elements off; max abs err "
                           f"{err.max().item():.3g}, scale {scale:.3g}")


ATTN_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def check_attention(got: torch.Tensor, want: torch.Tensor) -> None:
    """An attention kernel's output against its ref: same dtype/shape, every entry written and
    finite (outputs start NaN, unreadable cache rows are NaN), close within ``ATTN_TOL``."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all(), "unwritten or NaN-poisoned entries reached the output"
    atol, rtol = ATTN_TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
