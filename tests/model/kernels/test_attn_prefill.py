"""Packed varlen prefill attention over ring / paged caches: ``attention_prefill_ref`` against an
independent construction, and the Triton kernel against the ref.

Unmarked tests run on CPU (the kernel under the Triton interpreter, conftest sets TRITON_INTERPRET=1
per test) on tiny shapes; ``-m gpu`` tests run the compiled kernel on CUDA with the real Hymba
shapes. The Triton module is imported inside the tests, after the conftest has chosen interpreter
vs compiler (Triton decides when the kernel is decorated).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testutil import check_attention as check, column_slice, poisoned_empty

from hymba_batch.model.kernels import backend
from hymba_batch.model.kernels.attention import attention_prefill, attention_prefill_ref, attention_ref


def attention_prefill_triton(*args, **kwargs):
    from hymba_batch.model.kernels._attn_prefill_triton import attention_prefill_triton as fn
    return fn(*args, **kwargs)


def visible_history(start: int, window: int | None) -> range:
    """Cached positions some query of a chunk starting at ``start`` can see."""
    return range(0 if window is None else max(0, start - window), start)


def host_bounds(starts: list[int], lens: list[int], window: int | None) -> dict[str, int]:
    """The host ints a caller passes: max chunk length, max history a query can see."""
    hist = [s if window is None else min(s, window) for s in starts]
    return dict(max_chunk=max(lens), max_hist=max(hist))


def make_case(kind: str, dtype: torch.dtype, starts: list[int], lens: list[int], *, nh=6, nkv=2, d=16,
              dv=32, M=8, window: int | None = 16, bs=4, seed=0, device="cpu", poison=True,
              strided=True, extra_slots=3):
    """Random prefill inputs. q / k / v are column slices of wider NaN-padded tensors (like the
    in_proj slices) when ``strided``. Cache rows no query may read are NaN when ``poison``; slots
    and blocks are random permutations, unused block-table entries point at a NaN block."""
    g = torch.Generator().manual_seed(seed)
    gd = g if device == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gd, device=device).to(dtype)

    def packed(T, heads, dim):
        x = rnd(T, heads * dim)
        if strided:
            x = column_slice(x, 8, g)
        return x.view(T, heads, dim)

    B, T = len(starts), sum(lens)
    S = B + extra_slots
    q, k, v = packed(T, nh, d), packed(T, nkv, d), packed(T, nkv, dv)
    meta_k, meta_v = rnd(M, nkv, d), rnd(M, nkv, dv)
    slot_idx = torch.randperm(S, generator=g)[:B]
    if kind == "ring":
        R = window + 1
        ck, cv = rnd(S, R, nkv, d), rnd(S, R, nkv, dv)
        block_table = None
        seen = torch.zeros(S, R, dtype=torch.bool)
        for b in range(B):
            for m in visible_history(starts[b], window):
                seen[int(slot_idx[b]), m % R] = True
    else:
        max_blocks = max(math.ceil(s / bs) for s in starts) + 2
        num_blocks = S * max_blocks + 5
        ck, cv = rnd(num_blocks, bs, nkv, d), rnd(num_blocks, bs, nkv, dv)
        perm = torch.randperm(num_blocks, generator=g)
        block_table = perm[: S * max_blocks].view(S, max_blocks).to(torch.int32)
        seen = torch.zeros(num_blocks, bs, dtype=torch.bool)
        junk = int(perm[-1])  # a block nobody owns: unused table entries point at it
        for b in range(B):
            s = int(slot_idx[b])
            block_table[s, math.ceil(starts[b] / bs):] = junk
            for m in visible_history(starts[b], window):
                seen[int(block_table[s, m // bs]), m % bs] = True
        block_table = block_table.to(device)
    if poison:
        ck[~seen.to(device)] = float("nan")
        cv[~seen.to(device)] = float("nan")
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return dict(q=q, k=k, v=v, meta_k=meta_k, meta_v=meta_v, cache_k=ck, cache_v=cv,
                slot_idx=slot_idx.to(device), start=torch.tensor(starts, device=device), cu=cu.to(device),
                window=window, block_table=block_table)


def run_fast(case, starts, lens, **kw):
    """Direct kernel call into a NaN-filled ``out`` (unwritten rows stay NaN)."""
    T, nh = case["q"].shape[:2]
    out = torch.full((T, nh * case["meta_v"].shape[-1]), float("nan"), dtype=case["q"].dtype,
                     device=case["q"].device)
    res = attention_prefill_triton(**case, **host_bounds(starts, lens, case["window"]), out=out, **kw)
    assert res.data_ptr() == out.data_ptr()
    return res


# ---- the ref against an independent construction ---------------------------------------------

def write_chunk(cache, slot, chunk, first, block_table):
    """Write rows of one sequence at real positions first.. into a ring / paged cache (in order,
    so a ring keeps the latest window + 1)."""
    for i in range(chunk.shape[0]):
        m = first + i
        if block_table is None:
            cache[slot, m % cache.shape[1]] = chunk[i]
        else:
            bs = cache.shape[1]
            cache[block_table[slot, m // bs], m % bs] = chunk[i]


@pytest.mark.parametrize("kind,window", [("ring", 16), ("paged", None), ("paged", 16)])
def test_chunked_prefill_equals_full_attention(kernel_device, kind, window):
    """Each sequence's whole-sequence uncached ``attention_ref`` == its rows of a sequence of
    prefill steps (chunks of 1, of window + 1 and longer, several sequences per step, each
    step's chunks written to a NaN-initialised cache after the step as the engine does), for the
    ref and for the kernel."""
    g = torch.Generator().manual_seed(3)
    nh, nkv, d, dv, M, bs = 6, 2, 16, 32, 8, 4
    seq_lens = [45, 1, 30, 19]
    cuts = [[0, 17, 18, 45], [0, 1], [0, 30], [0, 2, 19]]  # chunk boundaries per sequence
    meta_k, meta_v = torch.randn(M, nkv, d, generator=g), torch.randn(M, nkv, dv, generator=g)
    full = [(torch.randn(L, nh, d, generator=g), torch.randn(L, nkv, d, generator=g),
             torch.randn(L, nkv, dv, generator=g)) for L in seq_lens]
    want = []
    for (q, k, v), L in zip(full, seq_lens):
        idx = torch.arange(M + L)
        want.append(attention_ref(q, torch.cat([meta_k, k]), torch.cat([meta_v, v]), idx[M:], idx, window, M))

    S = len(seq_lens) + 2
    slots = torch.randperm(S, generator=g)[:len(seq_lens)]
    nan = float("nan")
    if kind == "ring":
        ck, cv, table = torch.full((S, window + 1, nkv, d), nan), torch.full((S, window + 1, nkv, dv), nan), None
    else:
        nb = S * math.ceil(max(seq_lens) / bs)
        ck, cv = torch.full((nb, bs, nkv, d), nan), torch.full((nb, bs, nkv, dv), nan)
        table = torch.randperm(nb, generator=g).view(S, -1).to(torch.int32)
    got = {"ref": [[] for _ in seq_lens], "fast": [[] for _ in seq_lens]}
    for step in range(max(len(c) for c in cuts) - 1):
        seqs = [b for b in range(len(seq_lens)) if step + 1 < len(cuts[b])]
        starts = [cuts[b][step] for b in seqs]
        lens = [cuts[b][step + 1] - cuts[b][step] for b in seqs]
        rows = [slice(s, s + n) for s, n in zip(starts, lens)]
        case = dict(q=torch.cat([full[b][0][r] for b, r in zip(seqs, rows)]),
                    k=torch.cat([full[b][1][r] for b, r in zip(seqs, rows)]),
                    v=torch.cat([full[b][2][r] for b, r in zip(seqs, rows)]),
                    meta_k=meta_k, meta_v=meta_v, cache_k=ck, cache_v=cv, slot_idx=slots[seqs],
                    start=torch.tensor(starts), cu=torch.tensor([0] + lens).cumsum(0).to(torch.int32),
                    window=window, block_table=table)
        outs = {"ref": attention_prefill_ref(**case), "fast": run_fast(case, starts, lens, block_q=16, block_n=16)}
        for which, out in outs.items():
            for j, b in enumerate(seqs):
                got[which][b].append(out[int(case["cu"][j]):int(case["cu"][j + 1])])
        for b, r in zip(seqs, rows):
            write_chunk(ck, int(slots[b]), full[b][1][r], r.start, table)
            write_chunk(cv, int(slots[b]), full[b][2][r], r.start, table)
    for which in ("ref", "fast"):
        for b in range(len(seq_lens)):
            check(torch.cat(got[which][b]), want[b])


@pytest.mark.parametrize("kind,window", [("ring", 16), ("paged", None)])
def test_ref_equals_engine_sdpa_path(kernel_device, kind, window):
    """The engine's padded [meta | history | chunk] + dense-mask SDPA formulation that the kernel
    replaces (mirrored op for op by the benchmark's ``sdpa_path``) == attention_prefill_ref; and
    the benchmark's FLOP count uses exactly the pairs that formulation's mask allows."""
    from hymba_batch.jobs.bench.attn_prefill import make_inputs, sdpa_inputs, sdpa_path, visible_pairs

    starts, lens, M = [0, 5, 17, 40, 3], [20, 7, 33, 17, 45], 8
    args = make_inputs(kind, window, starts, lens, 4, "cpu", dtype=torch.float32, nh=6, nkv=2, d=16,
                       dv=32, num_meta=M)
    check(sdpa_path(args, starts, lens), attention_prefill_ref(**args))
    mask = sdpa_inputs(args, starts, lens)[3][:, 0]  # [B, Lmax, Tk]
    real_rows = sum(int(mask[b, :n].sum()) for b, n in enumerate(lens))
    assert visible_pairs(starts, lens, window, M) == real_rows


@pytest.mark.parametrize("kind,window", [("ring", 16), ("paged", None), ("paged", 16)])
def test_ref_query_blocks_change_nothing(monkeypatch, kind, window):
    """The ref's query blocks (3 rows, so blocks cut every chunk and the window inside a block)
    give what one block per chunk gives."""
    from hymba_batch.model.kernels import attention

    case = make_case(kind, torch.float32, STARTS, LENS, window=window, seed=4)
    monkeypatch.setattr(attention, "PREFILL_REF_QUERY_BLOCK", 10_000)
    whole = attention_prefill_ref(**case)
    monkeypatch.setattr(attention, "PREFILL_REF_QUERY_BLOCK", 3)
    check(attention_prefill_ref(**case), whole)


# ---- CPU (Triton interpreter) vs the ref ------------------------------------------------------

# window 16 (ring holds 17): histories and chunks shorter than, equal to and longer than 17,
# chunk length 1, start 0 mixed with start > 0
STARTS = [0, 0, 5, 17, 40, 16, 3, 0]
LENS = [1, 20, 7, 33, 17, 1, 45, 17]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,window", [("ring", 16), ("paged", None), ("paged", 16)])
def test_dispatch_fast_matches_ref(kernel_device, kind, window, dtype):
    """attention_prefill with backend.force('fast') (interpreter, default blocks, NaN-poisoned
    torch.empty) vs force('ref')."""
    case = make_case(kind, dtype, STARTS, LENS, window=window, seed=1)
    bounds = host_bounds(STARTS, LENS, window)
    with backend.force("ref"):
        want = attention_prefill(**case, **bounds)
    with backend.force("fast"), poisoned_empty():
        assert backend.use_fast(case["q"])
        got = attention_prefill(**case, **bounds)
    check(got, want)


@pytest.mark.parametrize("splits,block_q,block_n", [(1, 16, 16), (3, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,window", [("ring", 16), ("paged", None)])
def test_kernel_matches_ref(kernel_device, kind, window, dtype, splits, block_q, block_n):
    """Direct call with forced blocks and split count: multi-block loops, every masked / unmasked
    range boundary inside a block, split-KV partials and their combine."""
    case = make_case(kind, dtype, STARTS, LENS, window=window, seed=2 + splits + block_q)
    check(run_fast(case, STARTS, LENS, num_splits=splits, block_q=block_q, block_n=block_n),
          attention_prefill_ref(**case))


@pytest.mark.parametrize("nh,nkv,d,dv,bs", [(5, 1, 16, 32, 4), (10, 2, 12, 20, 3), (4, 4, 16, 32, 8)])
def test_group_and_head_dims(kernel_device, nh, nkv, d, dv, bs):
    """GROUP 5 (the real model's), non-power-of-two head dims and page size, MHA."""
    starts, lens = [0, 9, 30], [13, 20, 6]
    for kind, window in (("ring", 16), ("paged", None)):
        case = make_case(kind, torch.float32, starts, lens, nh=nh, nkv=nkv, d=d, dv=dv, bs=bs,
                         window=window, seed=nh + d)
        check(run_fast(case, starts, lens, block_q=16, block_n=16), attention_prefill_ref(**case))


def test_window_narrower_than_tile(kernel_device):
    """Window 3 with 32-row tiles (GROUP 1): no key is visible to every row of a tile, so the
    unmasked chunk range is empty and the two masked ranges meet."""
    starts, lens = [0, 10, 2], [40, 35, 9]
    for kind in ("ring", "paged"):
        case = make_case(kind, torch.float32, starts, lens, nh=2, nkv=2, window=3, seed=7)
        check(run_fast(case, starts, lens, block_q=32, block_n=16), attention_prefill_ref(**case))


def test_no_meta_tokens_and_inputs_untouched(kernel_device):
    """M = 0 (every query still sees itself), and the kernel writes nothing but its output."""
    starts, lens = [0, 6], [9, 5]
    case = make_case("paged", torch.float32, starts, lens, M=0, window=None, seed=5, poison=False)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    check(run_fast(case, starts, lens, num_splits=2, block_q=16, block_n=16), attention_prefill_ref(**case))
    for k, v in before.items():
        assert torch.equal(case[k], v), k


# ---- GPU (real shapes) ------------------------------------------------------------------------

gpu = pytest.mark.gpu
REAL = dict(nh=25, nkv=5, d=64, dv=128, M=128)


def real_case(kind, window, starts, lens, seed, bs=64, dtype=torch.bfloat16):
    return make_case(kind, dtype, starts, lens, window=window, bs=bs, seed=seed, device="cuda",
                     poison=True, extra_slots=5, **REAL)


@gpu
@pytest.mark.parametrize("kind,window", [("ring", 1024), ("paged", None)])
def test_gpu_short_prompts(kernel_device, kind, window):
    """16 sequences x 1024 tokens from start 0 (the engine's first-chunk step), and a mixed step."""
    for starts, lens in (([0] * 16, [1024] * 16), ([0, 0, 700, 1500, 3000, 0], [1, 1024, 333, 64, 1000, 17])):
        case = real_case(kind, window, starts, lens, seed=len(starts))
        check(run_fast(case, starts, lens), attention_prefill_ref(**case))
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("kind,window,starts,lens", [
    ("paged", None, [7000, 3000, 0], [1000, 500, 300]),
    ("ring", 1024, [2000, 1025, 5000], [700, 1030, 64]),
    ("paged", None, [7000], [64]),   # few tiles, long history: the split-KV path
], ids=["paged-7000", "ring-5000", "paged-tail"])
def test_gpu_long_histories(kernel_device, kind, window, starts, lens):
    case = real_case(kind, window, starts, lens, seed=sum(starts))
    want = attention_prefill_ref(**case)
    check(run_fast(case, starts, lens), want)
    check(run_fast(case, starts, lens, num_splits=1), want)
    check(run_fast(case, starts, lens, num_splits=4), want)
    torch.cuda.synchronize()


@gpu
def test_gpu_fp32(kernel_device):
    starts, lens = [0, 1100, 40], [300, 200, 1]
    case = real_case("ring", 1024, starts, lens, seed=11, dtype=torch.float32)
    check(run_fast(case, starts, lens), attention_prefill_ref(**case))


@gpu
@pytest.mark.parametrize("kind,window", [("ring", 1024), ("paged", None)])
def test_gpu_no_host_sync(kernel_device, kind, window):
    """The dispatcher never synchronises with the device (split and unsplit launches)."""
    for starts, lens in (([0, 2000], [1024, 512]), ([7000], [16])):
        case = real_case(kind, window, starts, lens, seed=13)
        bounds = host_bounds(starts, lens, window)
        attention_prefill(**case, **bounds)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = attention_prefill(**case, **bounds)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        check(got, attention_prefill_ref(**case))
