"""Decode attention over ring / paged caches: Triton kernel vs ``attention_decode_ref``.

Unmarked tests run the kernel on CPU under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 per test) on tiny shapes; ``-m gpu`` tests run the compiled kernel on CUDA with
the real Hymba shapes. The Triton module is imported inside the tests, after the conftest has
chosen interpreter vs compiler (Triton decides when the kernel is decorated).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testutil import check_attention as check, poisoned_empty

from hymba_batch.model.kernels import backend
from hymba_batch.model.kernels.attention import attention_decode, attention_decode_ref


def attention_decode_triton(*args, **kwargs):
    from hymba_batch.model.kernels._attn_decode_triton import attention_decode_triton as fn
    return fn(*args, **kwargs)


CTX_TINY = [1, 5, 16, 17, 40, 33, 2]  # window 16: shorter than, equal to, window+1, longer


def make_case(kind: str, dtype: torch.dtype, ctx_lens: list[int], *, nh=4, nkv=2, d=16, dv=32, M=8,
              window: int | None = 16, bs=4, seed=0, device="cpu", poison=True, extra_slots=3):
    """Random decode inputs. Cache rows that no sequence may see are NaN (when ``poison``), so any
    out-of-range read shows up as NaN in the output; slots and blocks are random permutations."""
    g = torch.Generator().manual_seed(seed)
    gd = g if device == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gd, device=device).to(dtype)

    B = len(ctx_lens)
    S = B + extra_slots
    q = rnd(B, nh, d)
    meta_k, meta_v = rnd(M, nkv, d), rnd(M, nkv, dv)
    slot_idx = torch.randperm(S, generator=g)[:B].to(device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    n = ctx.long() - 1
    first = (n - window).clamp(min=0) if window is not None else torch.zeros_like(n)
    if kind == "ring":
        R = window + 1
        ck, cv = rnd(S, R, nkv, d), rnd(S, R, nkv, dv)
        block_table = None
        if poison:
            seen = torch.zeros(S, R, dtype=torch.bool)
            for b in range(B):
                for m in range(int(first[b]), int(n[b]) + 1):
                    seen[int(slot_idx[b]), m % R] = True
            ck[~seen.to(device)] = float("nan")
            cv[~seen.to(device)] = float("nan")
    else:
        max_blocks = max(math.ceil(c / bs) for c in ctx_lens) + 2
        num_blocks = S * max_blocks + 5
        ck, cv = rnd(num_blocks, bs, nkv, d), rnd(num_blocks, bs, nkv, dv)
        perm = torch.randperm(num_blocks, generator=g)
        block_table = perm[: S * max_blocks].view(S, max_blocks).to(torch.int32)
        if poison:
            seen = torch.zeros(num_blocks, bs, dtype=torch.bool)
            junk = int(perm[-1])  # a block nobody owns: unused table entries point at it
            for b in range(B):
                s = int(slot_idx[b])
                need = math.ceil(ctx_lens[b] / bs)
                block_table[s, need:] = junk
                for m in range(int(first[b]), int(n[b]) + 1):
                    seen[int(block_table[s, m // bs]), m % bs] = True
            ck[~seen.to(device)] = float("nan")
            cv[~seen.to(device)] = float("nan")
        block_table = block_table.to(device)
    return dict(q=q, meta_k=meta_k, meta_v=meta_v, cache_k=ck, cache_v=cv, slot_idx=slot_idx,
                ctx_len=ctx.to(device), window=window, block_table=block_table)


def run_fast(case, **kw):
    B, nh = case["q"].shape[:2]
    out = torch.full((B, nh * case["meta_v"].shape[-1]), float("nan"), dtype=case["q"].dtype,
                     device=case["q"].device)
    res = attention_decode_triton(**case, out=out, **kw)
    assert res.data_ptr() == out.data_ptr()
    return res


# ---- CPU (Triton interpreter) -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ring", "paged"])
def test_dispatch_fast_matches_ref(kernel_device, kind, dtype):
    """attention_decode with backend.force('fast') (interpreter, NaN-poisoned torch.empty) vs
    force('ref')."""
    window = 16 if kind == "ring" else None
    case = make_case(kind, dtype, CTX_TINY, window=window, seed=1)
    with backend.force("ref"):
        want = attention_decode(**case)
    with backend.force("fast"), poisoned_empty():
        assert backend.use_fast(case["q"])
        got = attention_decode(**case)
    check(got, want)


@pytest.mark.parametrize("splits,block_n", [(1, 16), (3, 16), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ring", "paged"])
def test_kernel_matches_ref(kernel_device, kind, dtype, splits, block_n):
    """Direct call with forced split count / key block (multi-block loops, meta/real boundary
    inside a block, split-K combine, empty splits for short sequences)."""
    window = 16 if kind == "ring" else None
    case = make_case(kind, dtype, CTX_TINY, window=window, seed=2 + splits + block_n)
    check(run_fast(case, num_splits=splits, block_n=block_n), attention_decode_ref(**case))


@pytest.mark.parametrize("ctx", [1, 5, 16, 17, 40])
def test_single_context_lengths(kernel_device, ctx):
    """Each context length alone (uniform batch), ring fp32, plus the paged cache with a window."""
    for kind, window in (("ring", 16), ("paged", 16)):
        case = make_case(kind, torch.float32, [ctx] * 3, window=window, seed=10 + ctx)
        check(run_fast(case), attention_decode_ref(**case))


@pytest.mark.parametrize("nh,nkv,d,dv,bs", [(10, 2, 16, 32, 4), (6, 3, 12, 20, 3), (4, 4, 16, 32, 8)])
def test_group_and_head_dims(kernel_device, nh, nkv, d, dv, bs):
    """GROUP 5 (the real model's), non-power-of-two group / head dims / page size, MHA."""
    for kind in ("ring", "paged"):
        window = 16 if kind == "ring" else None
        case = make_case(kind, torch.float32, [3, 17, 29, 1], nh=nh, nkv=nkv, d=d, dv=dv, bs=bs,
                         window=window, seed=nh + d)
        check(run_fast(case, num_splits=2, block_n=16), attention_decode_ref(**case))


def test_meta_is_read_in_place_and_inputs_untouched(kernel_device):
    case = make_case("paged", torch.float32, [9, 1], window=None, seed=5, poison=False)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    run_fast(case, num_splits=2)
    for k, v in before.items():
        assert torch.equal(case[k], v), k


# ---- GPU (real shapes) ------------------------------------------------------------------------

gpu = pytest.mark.gpu
REAL = dict(nh=25, nkv=5, d=64, dv=128, M=128)


def real_case(kind, B, max_ctx, seed, bs=64):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_ctx + 1, (B,), generator=g)
    ctx[0] = max_ctx
    window = 1024 if kind == "ring" else None
    return make_case(kind, torch.bfloat16, ctx.tolist(), window=window, bs=bs, seed=seed, device="cuda",
                     poison=False, extra_slots=7, **REAL)


def ref_chunked(case, chunk=32):
    """The reference materialises [B, nh, d, Tk] fp32; run it a few sequences at a time."""
    outs = []
    B = case["q"].shape[0]
    for i in range(0, B, chunk):
        sl = slice(i, i + chunk)
        sub = dict(case, q=case["q"][sl], slot_idx=case["slot_idx"][sl], ctx_len=case["ctx_len"][sl])
        outs.append(attention_decode_ref(**sub))
    return torch.cat(outs)


@gpu
@pytest.mark.parametrize("B", [1, 64, 1024])
@pytest.mark.parametrize("kind,max_ctx", [("ring", 640), ("ring", 3000), ("paged", 640), ("paged", 8192)])
def test_gpu_real_shapes(kernel_device, kind, max_ctx, B):
    case = real_case(kind, B, max_ctx, seed=B + max_ctx)
    want = ref_chunked(case)
    check(run_fast(case), want)
    check(run_fast(case, max_ctx=max_ctx), want)
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("kind", ["ring", "paged"])
def test_gpu_no_host_sync_and_cuda_graph(kernel_device, kind):
    """The wrapper never synchronises, and a captured graph replays correctly on new lengths."""
    B, max_ctx = 8, 4096
    case = real_case(kind, B, max_ctx, seed=7, bs=16)
    attention_decode_triton(**case, max_ctx=max_ctx)  # compile outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention_decode_triton(**case, max_ctx=max_ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = torch.empty(B, 25 * 128, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_decode_triton(**case, max_ctx=max_ctx, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_decode_triton(**case, max_ctx=max_ctx, out=out)
    for new in ([4096, 1, 2, 1025, 1026, 3000, 17, 64], [1] * 8):
        case["ctx_len"].copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, attention_decode_ref(**case))
