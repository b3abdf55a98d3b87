"""Micro-benchmark: decode attention over the ring / paged KV caches, Triton vs the reference.

Real Hymba shapes (nh 25, nkv 5, d 64, dv 128, 128 meta tokens, window 1024, bf16), B sequences
all at the same context length. Times ``attention_decode_triton`` (default heuristics, plus a
small sweep of key-block / warps / stages) and ``attention_decode_ref`` with
``triton.testing.do_bench`` (median), and reports achieved bandwidth = bytes of K/V the kernel
must read / time, against the H200's ~4.3 TB/s copy bandwidth. Bytes counted: every sequence's
visible real tokens (ring: min(ctx, 1025); paged: ctx) x nkv x (d + dv) x 2 B, plus the shared
meta K/V once (each program re-reads it, but from L2). Prints a table, then one JSON line last.

    python -m hymba_batch.jobs.bench.attn_decode [--B 1024] [--ctx 640 2048] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

NH, NKV, D, DV, M, WINDOW = 25, 5, 64, 128, 128, 1024
PEAK_BPS = 4.3e12


def make_inputs(kind: str, B: int, ctx: int, bs: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dt)

    q = rnd(B, NH, D)
    meta_k, meta_v = rnd(M, NKV, D), rnd(M, NKV, DV)
    slot_idx = torch.randperm(B, generator=g, device="cuda")
    ctx_len = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    if kind == "ring":
        R = WINDOW + 1
        ck, cv = rnd(B, R, NKV, D), rnd(B, R, NKV, DV)
        bt, window, visible = None, WINDOW, min(ctx, WINDOW + 1)
    else:
        nb = math.ceil(ctx / bs)
        ck, cv = rnd(B * nb, bs, NKV, D), rnd(B * nb, bs, NKV, DV)
        bt = torch.randperm(B * nb, generator=g, device="cuda").view(B, nb).to(torch.int32)
        window, visible = None, ctx
    args = (q, meta_k, meta_v, ck, cv, slot_idx, ctx_len, window, bt)
    nbytes = (B * visible + M) * NKV * (D + DV) * 2
    return args, nbytes


def main() -> None:
    import triton
    from triton.testing import do_bench

    from hymba_batch.model.kernels._attn_decode_triton import attention_decode_triton
    from hymba_batch.model.kernels.attention import attention_decode_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1024)
    ap.add_argument("--ctx", type=int, nargs="+", default=[640, 2048])
    ap.add_argument("--bs", type=int, default=64, help="paged block size")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-ref", action="store_true")
    a = ap.parse_args()

    sweep = [] if a.no_sweep else [dict(block_n=bn, num_warps=w, num_stages=s)
                                   for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    rows = []
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
          f"B={a.B} bs={a.bs}")
    hdr = f"{'kind':6} {'ctx':>5} {'MB read':>9} {'ref ms':>9} {'triton ms':>10} {'TB/s':>6} {'%peak':>6} " \
          f"{'speedup':>8} {'best ms':>8} {'best TB/s':>9}  best cfg"
    print(hdr)
    print("-" * len(hdr))
    for kind in ("ring", "paged"):
        for ctx in a.ctx:
            args, nbytes = make_inputs(kind, a.B, ctx, a.bs)
            want = None
            ref_ms = None
            if not a.no_ref:
                try:
                    want = attention_decode_ref(*args)
                    ref_ms = do_bench(lambda: attention_decode_ref(*args), return_mode="median")
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
            got = attention_decode_triton(*args, max_ctx=ctx)
            err = None if want is None else (got.float() - want.float()).abs().max().item()
            ms = do_bench(lambda: attention_decode_triton(*args, max_ctx=ctx), return_mode="median")
            best = (ms, {})
            for cfg in sweep:
                try:
                    t = do_bench(lambda: attention_decode_triton(*args, max_ctx=ctx, **cfg),
                                 return_mode="median")
                except Exception as e:  # e.g. out of shared memory for a config
                    print(f"  skip {cfg}: {type(e).__name__}")
                    continue
                if t < best[0]:
                    best = (t, cfg)
            bw = nbytes / (ms * 1e-3)
            row = dict(kind=kind, ctx=ctx, B=a.B, bytes=nbytes, ref_ms=ref_ms, triton_ms=ms,
                       tbps=bw / 1e12, frac_peak=bw / PEAK_BPS,
                       speedup=(ref_ms / ms) if ref_ms else None, max_abs_err=err,
                       best_ms=best[0], best_tbps=nbytes / (best[0] * 1e-3) / 1e12, best_cfg=best[1])
            rows.append(row)
            ref_s = f"{ref_ms:9.3f}" if ref_ms else f"{'oom':>9}"
            sp_s = f"{row['speedup']:7.1f}x" if ref_ms else f"{'-':>8}"
            print(f"{kind:6} {ctx:5d} {nbytes / 1e6:9.1f} {ref_s} {ms:10.3f} {bw / 1e12:6.2f} "
                  f"{100 * bw / PEAK_BPS:5.1f}% {sp_s} {best[0]:8.3f} {row['best_tbps']:9.2f}  {best[1] or 'default'}"
                  + (f"  err {err:.2e}" if err is not None else ""))
            del args, want, got
            torch.cuda.empty_cache()
    print(json.dumps({"bench": "attn_decode", "device": torch.cuda.get_device_name(), "peak_tbps": PEAK_BPS / 1e12,
                      "rows": rows}))


if __name__ == "__main__":
    main()
