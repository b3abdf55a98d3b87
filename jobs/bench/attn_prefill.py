"""Micro-benchmark: packed varlen prefill attention for one layer, the Triton kernel
(``attention_prefill_triton``) vs the engine's padded SDPA path it replaces.

The SDPA path was ``PrefillOps._keys`` + ``PrefillOps.attention`` of model/engine/runner.py (removed
from the engine once this kernel measured faster; kept here as the baseline), reproduced tensor op for tensor op in ``sdpa_path``: gather the
visible history from the cache into a [B, Hmax] pad, scatter the chunk into a [B, Lmax] pad, cat
[meta | history | chunk] K/V per sequence, build the dense [B, 1, Lmax, M+Hmax+Lmax] mask, pad q,
``attention_sdpa``, unpad. The engine's cache write of the chunk is left out (the kernel path
writes the same rows). ``sdpa only`` times the SDPA call alone on the prebuilt tensors.

Real Hymba-1.5B shapes in bf16: nh 25, nkv 5, d 64, dv 128, 128 meta tokens; ring cache
(window 1024, R 1025) for sliding-window layers, paged cache (``--bs``) for global ones. Cases:

  S-ring / S-global   16 sequences x 1024 tokens from start 0 (a first-chunk step)
  L-global            2 sequences x 7000-token chunks after 7000 cached tokens (paged)
  R-ring              8 sequences x 1024-token chunks after 3000 cached tokens (ring)
  tail-global         1 sequence x 256 tokens after 7000 cached tokens (few tiles: split-KV)

Times are ``triton.testing.do_bench`` medians. TFLOP/s counts only visible query-key pairs:
2 * nh * (d + dv) FLOPs per pair, pairs = sum over queries of M + (real keys it may see).
Errors are max |out - attention_prefill_ref| (``--no-ref`` skips the ref). ``--sweep`` also times
a few launch configs of the kernel. Prints a table, then one JSON line last.

    python -m hymba_batch.jobs.bench.attn_prefill [--cases S-ring L-global ...] [--bs 64]
        [--sweep] [--no-ref] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

NH, NKV, D, DV, M, WINDOW = 25, 5, 64, 128, 128, 1024

CASES: dict[str, dict] = {
    "S-ring": dict(kind="ring", window=WINDOW, starts=[0] * 16, lens=[1024] * 16),
    "S-global": dict(kind="paged", window=None, starts=[0] * 16, lens=[1024] * 16),
    "L-global": dict(kind="paged", window=None, starts=[7000] * 2, lens=[7000] * 2),
    "R-ring": dict(kind="ring", window=WINDOW, starts=[3000] * 8, lens=[1024] * 8),
    "tail-global": dict(kind="paged", window=None, starts=[7000], lens=[256]),
}

# launch configs for --sweep (the default is block_q 128, block_n 64, 8 warps, 3 stages); each
# compiles for sm_90 with at most a few bytes of register spill (ptxas -v, Triton 3.9)
SWEEP = [dict(block_q=bq, block_n=bn, num_warps=w, num_stages=s)
         for bq, bn, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2),
                              (128, 64, 8, 4), (128, 128, 8, 2))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--bs", type=int, default=64, help="paged block size")
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel launch configs")
    ap.add_argument("--no-ref", action="store_true", help="skip the error check against the ref")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON line here")
    return ap.parse_args(argv)


def visible_pairs(starts: list[int], lens: list[int], window: int | None, num_meta: int) -> int:
    """Query-key pairs the masks allow: query at real position p sees num_meta meta keys and the
    real keys max(0, p - window) .. p (0 .. p without a window)."""
    total = 0
    for s, n in zip(starts, lens):
        p = torch.arange(s, s + n, dtype=torch.int64)
        real = p + 1 if window is None else torch.clamp(p, max=window) + 1
        total += int(real.sum()) + num_meta * n
    return total


def host_bounds(starts: list[int], lens: list[int], window: int | None) -> tuple[int, int]:
    """(max_chunk, max_hist): the host ints the engine passes the dispatcher."""
    return max(lens), max(s if window is None else min(s, window) for s in starts)


def make_inputs(kind: str, window: int | None, starts: list[int], lens: list[int], bs: int,
                device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                nh: int = NH, nkv: int = NKV, d: int = D, dv: int = DV, num_meta: int = M) -> dict:
    """Keyword arguments of ``attention_prefill_ref`` / ``_triton``: random packed q / k / v, meta
    K/V, a ring ([B + 1 slots, window + 1]) or paged cache (blocks for history + chunk per slot,
    a random permutation) holding random values, slots in random order."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    B, T = len(starts), sum(lens)
    S = B + 1
    slot_idx = torch.randperm(S, generator=g, device=device)[:B]
    if kind == "ring":
        ck, cv = rnd(S, window + 1, nkv, d), rnd(S, window + 1, nkv, dv)
        table = None
    else:
        per_seq = math.ceil(max(s + n for s, n in zip(starts, lens)) / bs)  # history + chunk, as reserved
        ck, cv = rnd(S * per_seq, bs, nkv, d), rnd(S * per_seq, bs, nkv, dv)
        table = torch.randperm(S * per_seq, generator=g, device=device).view(S, per_seq).to(torch.int32)
    cu = torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return dict(q=rnd(T, nh, d), k=rnd(T, nkv, d), v=rnd(T, nkv, dv),
                meta_k=rnd(num_meta, nkv, d), meta_v=rnd(num_meta, nkv, dv), cache_k=ck, cache_v=cv,
                slot_idx=slot_idx, start=torch.tensor(starts, dtype=torch.long, device=device), cu=cu,
                window=window, block_table=table)


def sdpa_inputs(args: dict, starts: list[int], lens: list[int]):
    """The engine's padded layout (runner.PrefillOps._keys / .attention without the cache write):
    returns (qq [B, nh, Lmax, d], K [B, nkv, Tk, d], V [B, nkv, Tk, dv], mask [B, 1, Lmax, Tk],
    row_b, row_i) with Tk = M + Hmax + Lmax."""
    from hymba_batch.model.kernels.attention import gather_cache

    q, k, v, window = args["q"], args["k"], args["v"], args["window"]
    start, slot_idx, dev = args["start"], args["slot_idx"], q.device
    B, Lmax = len(lens), max(lens)
    lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
    row_b = torch.repeat_interleave(torch.arange(B, device=dev), lens_t)
    row_i = torch.arange(sum(lens), device=dev) - args["cu"][:-1].long()[row_b]
    q_valid = torch.arange(Lmax, device=dev)[None, :] < lens_t[:, None]
    q_pos = start[:, None] + torch.arange(Lmax, device=dev)[None, :]
    # _keys
    first = torch.zeros_like(start) if window is None else (start - window).clamp(min=0)
    hist_len = start - first
    Hmax = max(starts) if window is None else min(max(starts), window)
    ar = torch.arange(Hmax, device=dev)
    h_pos = first[:, None] + ar[None, :]
    h_valid = ar[None, :] < hist_len[:, None]
    h_pos_safe = h_pos.where(h_valid, torch.zeros_like(h_pos))
    hk = gather_cache(args["cache_k"], slot_idx, h_pos_safe, args["block_table"])
    hv = gather_cache(args["cache_v"], slot_idx, h_pos_safe, args["block_table"])
    nkv = k.shape[1]
    ck_chunk = k.new_zeros(B, Lmax, nkv, k.shape[2])
    cv_chunk = v.new_zeros(B, Lmax, nkv, v.shape[2])
    ck_chunk[row_b, row_i] = k
    cv_chunk[row_b, row_i] = v
    mk, mv = args["meta_k"], args["meta_v"]
    num_meta = mk.shape[0]
    K = torch.cat([mk.expand(B, *mk.shape), hk, ck_chunk], 1).transpose(1, 2)
    V = torch.cat([mv.expand(B, *mv.shape), hv, cv_chunk], 1).transpose(1, 2)
    key_pos = torch.cat([h_pos, q_pos], 1)
    key_ok = torch.cat([h_valid, q_valid], 1)
    qp, kp = q_pos[:, :, None], key_pos[:, None, :]
    vis = key_ok[:, None, :] & (kp <= qp)
    if window is not None:
        vis &= (qp - kp) <= window
    meta_vis = torch.ones(B, Lmax, num_meta, dtype=torch.bool, device=dev)
    mask = torch.cat([meta_vis, vis], 2)
    mask[:, :, 0] |= ~q_valid
    # attention
    qq = q.new_zeros(B, Lmax, q.shape[1], q.shape[2])
    qq[row_b, row_i] = q
    return qq.transpose(1, 2), K, V, mask[:, None], row_b, row_i


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The removed engine path's SDPA call: q [B, nh, Tq, d]; k [B, nkv, Tk, d]; v [B, nkv, Tk, dv];
    mask [B, 1, Tq, Tk] bool -> [B, nh, Tq, dv]; GQA natively on CUDA, expanded on the CPU."""
    import torch.nn.functional as F

    nh, nkv = q.shape[1], k.shape[1]
    if nh != nkv and not q.is_cuda:
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                          enable_gqa=nh != nkv)


def sdpa_path(args: dict, starts: list[int], lens: list[int]) -> torch.Tensor:
    """The engine's padded-SDPA prefill attention for one layer -> [T, nh*dv]."""
    qq, K, V, mask, row_b, row_i = sdpa_inputs(args, starts, lens)
    out = attention_sdpa(qq, K, V, mask)
    return out.transpose(1, 2)[row_b, row_i].reshape(args["q"].shape[0], -1)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    import triton
    from triton.testing import do_bench

    from hymba_batch.model.kernels._attn_prefill_triton import attention_prefill_triton
    from hymba_batch.model.kernels.attention import attention_prefill_ref

    def bench(fn) -> float:
        return do_bench(fn, return_mode="median")

    def max_err(got, want) -> float | None:
        return None if want is None else (got.float() - want.float()).abs().max().item()

    dev_name = torch.cuda.get_device_name()
    print(f"{dev_name}  triton {triton.__version__}  torch {torch.__version__}  bs={a.bs}")
    hdr = (f"{'case':12} {'T':>6} {'TFLOP':>7} {'triton ms':>10} {'TFLOP/s':>8} {'sdpa ms':>9} {'sdpa only':>10} "
           f"{'speedup':>8} {'err':>8} {'sdpa err':>9} {'best ms':>8}  best cfg")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for name in a.cases:
        c = CASES[name]
        starts, lens, window = c["starts"], c["lens"], c["window"]
        args = make_inputs(c["kind"], window, starts, lens, a.bs, "cuda")
        max_chunk, max_hist = host_bounds(starts, lens, window)
        flop = 2 * NH * (D + DV) * visible_pairs(starts, lens, window, M)

        def kernel(**cfg):
            return attention_prefill_triton(**args, max_chunk=max_chunk, max_hist=max_hist, **cfg)

        want = None
        if not a.no_ref:
            try:
                want = attention_prefill_ref(**args)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        got = kernel()
        err = max_err(got, want)
        ms = bench(kernel)
        best = (ms, {})
        for cfg in SWEEP if a.sweep else []:
            try:
                t = bench(lambda: kernel(**cfg))
            except Exception as e:  # e.g. out of shared memory for a config
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            if t < best[0]:
                best = (t, cfg)
        del got
        try:
            sdpa_out = sdpa_path(args, starts, lens)
            sdpa_err = max_err(sdpa_out, want)
            del sdpa_out
            sdpa_ms = bench(lambda: sdpa_path(args, starts, lens))
            qq, K, V, mask, _, _ = sdpa_inputs(args, starts, lens)
            sdpa_only_ms = bench(lambda: attention_sdpa(qq, K, V, mask))
            del qq, K, V, mask
        except torch.OutOfMemoryError:
            sdpa_err = sdpa_ms = sdpa_only_ms = None
        torch.cuda.empty_cache()
        row = dict(case=name, kind=c["kind"], window=window, B=len(starts), start=max(starts),
                   chunk=max(lens), T=sum(lens), tflop=flop / 1e12, triton_ms=ms,
                   triton_tflops=flop / (ms * 1e-3) / 1e12, sdpa_path_ms=sdpa_ms, sdpa_only_ms=sdpa_only_ms,
                   speedup=(sdpa_ms / ms) if sdpa_ms else None, max_abs_err=err, sdpa_max_abs_err=sdpa_err,
                   best_ms=best[0], best_cfg=best[1])
        rows.append(row)

        def f(x, w, p):
            return f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"
        print(f"{name:12} {row['T']:6d} {row['tflop']:7.3f} {ms:10.3f} {row['triton_tflops']:8.1f} "
              f"{f(sdpa_ms, 9, 3)} {f(sdpa_only_ms, 10, 3)} {f(row['speedup'], 7, 1)}x "
              f"{f(err, 8, 4)} {f(sdpa_err, 9, 4)} {best[0]:8.3f}  {best[1] or 'default'}")
        del args, want
        torch.cuda.empty_cache()
    line = json.dumps({"bench": "attn_prefill", "device": dev_name, "triton": triton.__version__,
                       "torch": torch.__version__, "block_size": a.bs, "rows": rows})
    if a.json_out is not None:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
