"""Micro-benchmark: the SSM-branch kernels (RMSNorm, causal conv1d varlen + update, selective scan
varlen + state update with fp32 and bf16 state pools) and the fused elementwise passes (the
mixer's averaged norms, RoPE, the MLP's SiLU gate), Triton vs the ``*_ref`` twins, and the
GEMMs the model runs against zero-padded weights (head, x_proj, dt_proj) vs the plain ones, and vs ``mamba_ssm`` / ``causal_conv1d``
when those import (they are not dependencies of this project, nor in its image: install them by
hand to get that comparison; it has not been run).

Real Hymba-1.5B shapes: E = 3200 channels, N = 16 states, K = 4 taps, hidden 1600; prefill packs
``--seqs`` sequences of ``--seqlen`` tokens (default 64 x 1024 = 65536 tokens; equal lengths so the
padded-batch mamba_ssm kernels see the same work); decode runs ``--decode-B`` sequences of one
token each, states in a pool of random slots. Activations bf16 (``--dtype``); the state update
runs on an fp32 and on a bf16 state pool (the engine's default for a bf16 model).
Times are ``triton.testing.do_bench`` medians (L2 flushed between runs); refs slower than 100 ms
a call are timed as the median of three single runs. Bytes are the minimum each op must move
(inputs read once, outputs written once, state read and written); GB/s = bytes / time.
``--sweep`` also times a few launch configs of each Triton kernel. Prints a table, then one JSON
line last.

    python -m hymba_batch.jobs.bench.kernels [--seqs 64 --seqlen 1024] [--decode-B 1024 4096]
        [--dtype bf16|fp32] [--no-ref] [--sweep] [--save]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

E, N, K, H, R, PROJ = 3200, 16, 4, 1600, 100, 8960   # d_inner, d_state, d_conv, hidden, dt_rank, in_proj rows
PEAK_BPS = 4.3e12  # H200 device-to-device copy, measured (device KINDS.md)


def _bench(fn) -> float:
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - t0) * 1e3
    if once_ms > 100:
        times = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|"""
    g, w = got.float(), want.float()
    return ((g - w).abs().max() / w.abs().max().clamp(min=1e-30)).item()


def _mamba_ops():
    ops = {}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        ops["selective_scan_fn"] = selective_scan_fn
    except Exception as e:  # noqa: BLE001 (optional comparison)
        ops["selective_scan_fn"] = f"n/a ({type(e).__name__})"
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        ops["selective_state_update"] = selective_state_update
    except Exception as e:  # noqa: BLE001
        ops["selective_state_update"] = f"n/a ({type(e).__name__})"
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        ops["causal_conv1d_fn"] = causal_conv1d_fn
        ops["causal_conv1d_update"] = causal_conv1d_update
    except Exception as e:  # noqa: BLE001
        ops["causal_conv1d_fn"] = ops["causal_conv1d_update"] = f"n/a ({type(e).__name__})"
    return ops


def main() -> None:
    import triton

    from hymba_batch.model.kernels import _conv_triton, _gate_triton, _rmsnorm_triton, _rope_triton, _scan_triton
    from hymba_batch.model.kernels.conv import causal_conv1d_update_ref, causal_conv1d_varlen_ref
    from hymba_batch.model.kernels.gate import silu_mul_ref
    from hymba_batch.model.kernels.rmsnorm import rmsnorm_avg_ref, rmsnorm_ref
    from hymba_batch.model.kernels.rope import apply_rope_ref
    from hymba_batch.model.kernels.scan import selective_scan_varlen_ref, selective_state_update_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--decode-B", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configs")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=["rmsnorm", "rmsnorm_avg", "rope", "silu_mul", "gemm", "conv1d_varlen", "conv1d_update",
                             "scan_varlen", "state_update"])
    ap.add_argument("--save", action="store_true", help="also write the JSON to jobs/bench/results/")
    a = ap.parse_args()

    dev = "cuda"
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    esz = 2 if dt == torch.bfloat16 else 4
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=dt, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale + shift).to(dtype)

    Bs, L = a.seqs, a.seqlen
    T = Bs * L
    cu = torch.arange(0, T + 1, L, device=dev, dtype=torch.int32)
    mamba = _mamba_ops()
    rows = []

    def record(op, shape, nbytes, fast_fn, ref_fn=None, ext=None, err=None, sweep=None, before=None):
        ms = _bench(fast_fn)
        before_ms = _bench(before) if before is not None else None  # the kernel this one replaced
        ref_ms = None if (ref_fn is None or a.no_ref) else _bench(ref_fn)
        ext_name, ext_ms = None, None
        if ext is not None:
            ext_name, ext_fn = ext
            if callable(ext_fn):
                try:
                    ext_ms = _bench(ext_fn)
                except Exception as e:  # noqa: BLE001
                    ext_name = f"{ext_name}: {type(e).__name__}: {str(e)[:60]}"
            else:
                ext_name = f"{ext_name} {ext_fn}"
        best, swept = None, {}
        for label, setup in (sweep or []) if a.sweep else []:
            with setup():
                try:
                    t = _bench(fast_fn)
                except Exception as e:  # noqa: BLE001 (a config may not compile)
                    print(f"    {op} {label}: {type(e).__name__}: {str(e)[:80]}")
                    continue
            swept[label] = t
            print(f"    {op} {shape} {label}: {t:.4f} ms")
            if best is None or t < best[0]:
                best = (t, label)
        row = dict(op=op, shape=shape, bytes=nbytes, triton_ms=ms, gbps=nbytes / ms / 1e6,
                   frac_peak=nbytes / (ms * 1e-3) / PEAK_BPS, ref_ms=ref_ms,
                   speedup_vs_ref=(ref_ms / ms) if ref_ms else None, ext=ext_name, ext_ms=ext_ms,
                   rel_err_vs_ref=err, best_sweep_ms=best[0] if best else None,
                   best_sweep_cfg=best[1] if best else None, sweep_ms=swept or None, before_ms=before_ms,
                   speedup_vs_before=(before_ms / ms) if before_ms else None)
        rows.append(row)
        f = lambda v, w=9, p=3: f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        print(f"{op:22} {shape:26} {nbytes / 1e6:9.1f} {f(ms)} {row['gbps']:8.0f} {f(ref_ms, 10)} "
              f"{f(row['speedup_vs_ref'], 8, 1)} {f(ext_ms)} {f(err, 9, 1) if err is None else f'{err:9.1e}'}"
              + (f"  before {before_ms:.3f} ms ({before_ms / ms:.2f}x)" if before_ms else "")
              + (f"  best {best[0]:.3f} ms {best[1]}" if best else "")
              + (f"  [{ext_name}]" if ext_name else ""))

    import contextlib

    @contextlib.contextmanager
    def override(cfg: dict, **kw):
        old = dict(cfg)
        cfg.update(kw)
        try:
            yield
        finally:
            cfg.clear()
            cfg.update(old)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {a.dtype}  prefill {Bs}x{L}={T} tokens  decode B={a.decode_B}")
    hdr = (f"{'op':22} {'shape':26} {'MB':>9} {'triton ms':>9} {'GB/s':>8} {'ref ms':>10} {'speedup':>8} "
           f"{'ext ms':>9} {'rel err':>9}")
    print(hdr)
    print("-" * len(hdr))

    want = lambda op: a.only is None or op in a.only  # noqa: E731
    # parameters shared by prefill and decode: conv weight/bias, A = -[1..N], D, dt bias
    w, b = rnd(E, K, scale=0.5), rnd(E, scale=0.1)
    A = -(torch.arange(1, N + 1, device=dev, dtype=torch.float32).expand(E, N).contiguous())
    D_, db = rnd(E, shift=1.0, scale=0.1), rnd(E, shift=-4.0, scale=1.0)

    # ---- RMSNorm (input/pre-MoE norm [T, 1600], pre-avg norms [T, 3200], B/C [T, 16], dt [T, 100])
    for D in (H, E, N, R) if want("rmsnorm") else ():
        x = rnd(T, D, scale=3.0)
        wn = rnd(D, shift=1.0, scale=0.1)
        got = _rmsnorm_triton.rmsnorm_triton(x, wn, 1e-6)
        err = None if a.no_ref else _err(got, rmsnorm_ref(x, wn, 1e-6))
        sweep = [(f"tile{mt}", (lambda mt=mt: override(_rmsnorm_triton.RMSNORM_CONFIG, MAX_TILE=mt)))
                 for mt in (1024, 4096, 8192, 16384)]
        record("rmsnorm", f"[{T},{D}]", 2 * T * D * esz + D * esz,
               lambda: _rmsnorm_triton.rmsnorm_triton(x, wn, 1e-6), lambda: rmsnorm_ref(x, wn, 1e-6),
               err=err, sweep=sweep)
        del x, wn, got

    # ---- the mixer's averaged norms: (rmsnorm(attn) + rmsnorm(y)) / 2 over [T, 3200] (ref: four passes)
    if want("rmsnorm_avg"):
        xa, xb = rnd(T, E, scale=3.0), rnd(T, E, scale=0.3)
        wa, wb = rnd(E, shift=1.0, scale=0.1), rnd(E, shift=1.0, scale=0.1)
        got = _rmsnorm_triton.rmsnorm_avg_triton(xa, wa, xb, wb, 1e-6)
        err = None if a.no_ref else _err(got, rmsnorm_avg_ref(xa, wa, xb, wb, 1e-6))
        record("rmsnorm_avg", f"2x[{T},{E}]", 3 * T * E * esz,
               lambda: _rmsnorm_triton.rmsnorm_avg_triton(xa, wa, xb, wb, 1e-6),
               lambda: rmsnorm_avg_ref(xa, wa, xb, wb, 1e-6), err=err)
        del xa, xb, got

    # ---- RoPE on q (25 heads) and k (5 heads): column slices of the in_proj output (ref: five passes)
    if want("rope"):
        P = rnd(T, PROJ)
        ang = torch.rand(T, 32, generator=g, device=dev) * 6.283
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(dt), torch.cat([ang.sin(), ang.sin()], -1).to(dt)
        for name, lo, heads in (("q", 0, 25), ("k", 1600, 5)):
            xq = P[:, lo:lo + heads * 64].view(T, heads, 64)
            got = _rope_triton.apply_rope_triton(xq, cos, sin)
            err = None if a.no_ref else _err(got, apply_rope_ref(xq, cos, sin))
            sweep = [(f"BT{bt} BC{bc} w{nw}", (lambda bt=bt, bc=bc, nw=nw: override(
                _rope_triton.ROPE_CONFIG, BLOCK_T=bt, BLOCK_C=bc, num_warps=nw)))
                for bt in (4, 8, 16) for bc in (64, 128, 256) for nw in (2, 4, 8)]
            record(f"rope {name}", f"[{T},{heads},64]", 2 * T * heads * 64 * esz + 2 * T * 64 * esz,
                   lambda: _rope_triton.apply_rope_triton(xq, cos, sin), lambda: apply_rope_ref(xq, cos, sin),
                   err=err, sweep=sweep)
        del P, got

    # ---- the MLP's gate SiLU(g) * u over [T, 5504] (ref: two passes)
    if want("silu_mul"):
        I_ = 5504
        gg, uu = rnd(T, I_, scale=2.0), rnd(T, I_)
        got = _gate_triton.silu_mul_triton(gg, uu)
        err = None if a.no_ref else _err(got, silu_mul_ref(gg, uu))
        sweep = [(f"B{bl} w{nw}", (lambda bl=bl, nw=nw: override(_gate_triton.GATE_CONFIG, BLOCK=bl, num_warps=nw)))
                 for bl in (1024, 2048, 4096) for nw in (4, 8)]
        record("silu_mul", f"[{T},{I_}]", 3 * T * I_ * esz, lambda: _gate_triton.silu_mul_triton(gg, uu),
               lambda: silu_mul_ref(gg, uu), err=err, sweep=sweep)
        del gg, uu, got

    # ---- GEMMs whose rows are not a multiple of 8 bf16 values, against the zero-padded weights
    # the model uses (model/hymba.py zero_padded): the head (32,001 -> 32,064 outputs) at decode
    # batch sizes, x_proj (132 -> 136 outputs) and dt_proj (100 -> 104 inputs) at decode batch
    # sizes and at the prefill's T tokens; padded in the "triton ms" column, plain in "ref ms"
    if want("gemm"):
        import torch.nn.functional as F

        from hymba_batch.model.hymba import zero_padded

        cases = [("gemm head", 32001, H, 32064, H, a.decode_B), ("gemm x_proj", 132, E, 136, E, a.decode_B + [T]),
                 ("gemm dt_proj", E, R, E, 104, a.decode_B + [T])]
        for op, n_out, k, n_pad, k_pad, sizes in cases:
            W = rnd(n_out, k, scale=0.02)
            Wp = zero_padded(W, n_pad, k_pad)
            for M in sizes:
                x = rnd(M, k)
                plain = lambda: F.linear(x, W)  # noqa: E731
                padded = lambda: F.linear(F.pad(x, (0, k_pad - k)) if k_pad > k else x, Wp)[:, :n_out]  # noqa: E731
                record(op, f"[{M},{k}]x[{k},{n_out}]", (M * k + n_out * k + M * n_out) * esz, padded, plain,
                       err=_err(padded(), plain()))
                del x
            del W, Wp

    # ---- causal conv1d varlen: s is a column slice of the in_proj output [T, 8960]
    if want("conv1d_varlen"):
        P = rnd(T, PROJ)
        s = P[:, 2560:2560 + E]
        pool = 2 * Bs
        slots = torch.randperm(pool, generator=g, device=dev)[:Bs]
        cst = rnd(pool, E, K - 1)
        c1, c2 = cst.clone(), cst.clone()
        got = _conv_triton.causal_conv1d_varlen_triton(s, w, b, cu, c1, slots)
        err = None if a.no_ref else _err(got, causal_conv1d_varlen_ref(s, w, b, cu, c2, slots))
        ext = None
        if callable(mamba["causal_conv1d_fn"]):
            xs = s.reshape(Bs, L, E).transpose(1, 2).contiguous()
            ext = ("causal_conv1d_fn", lambda: mamba["causal_conv1d_fn"](xs, w, b, activation="silu"))
        else:
            ext = ("causal_conv1d_fn", mamba["causal_conv1d_fn"])
        sweep = [(f"BT{bt} BC{bc} w{nw}", (lambda bt=bt, bc=bc, nw=nw: override(
            _conv_triton.CONV_CONFIG, BLOCK_T=bt, BLOCK_C=bc, num_warps=nw)))
            for bt in (8, 16, 32) for bc in (128, 256) for nw in (4, 8)]
        record("conv1d_varlen", f"[{T},{E}] K{K}", 2 * T * E * esz + 2 * Bs * E * (K - 1) * esz,
               lambda: _conv_triton.causal_conv1d_varlen_triton(s, w, b, cu, c1, slots),
               lambda: causal_conv1d_varlen_ref(s, w, b, cu, c2, slots), ext=ext, err=err, sweep=sweep)
        del P, s, got, c1, c2, cst

    # ---- causal conv1d update (decode)
    if want("conv1d_update"):
        for DB in a.decode_B:
            x = rnd(DB, E)
            pool = DB + DB // 2
            slots = torch.randperm(pool, generator=g, device=dev)[:DB]
            cst = rnd(pool, E, K - 1)
            c1, c2 = cst.clone(), cst.clone()
            got = _conv_triton.causal_conv1d_update_triton(x, w, b, c1, slots)
            err = None if a.no_ref else _err(got, causal_conv1d_update_ref(x, w, b, c2, slots))
            if callable(mamba["causal_conv1d_update"]):
                cs = rnd(DB, E, K)
                ext = ("causal_conv1d_update",
                       lambda: mamba["causal_conv1d_update"](x, cs, w, b, activation="silu"))
            else:
                ext = ("causal_conv1d_update", mamba["causal_conv1d_update"])
            sweep = [(f"BC{bc} w{nw}", (lambda bc=bc, nw=nw: override(
                _conv_triton.UPDATE_CONFIG, BLOCK_C=bc, num_warps=nw)))
                for bc in (64, 128, 256, 512) for nw in (2, 4)]
            record("conv1d_update", f"B{DB} [{E}] K{K}", 2 * DB * E * esz + 2 * DB * E * (K - 1) * esz,
                   lambda: _conv_triton.causal_conv1d_update_triton(x, w, b, c1, slots),
                   lambda: causal_conv1d_update_ref(x, w, b, c2, slots), ext=ext, err=err, sweep=sweep)
            del x, cst, c1, c2, got

    # ---- selective scan varlen (prefill)
    if want("scan_varlen"):
        u = rnd(T, E, scale=0.7)
        delta = rnd(T, E, scale=0.5)
        P = rnd(T, PROJ)
        z = P[:, PROJ - E:]
        Bm, Cm = rnd(T, N), rnd(T, N)
        pool = 2 * Bs
        slots = torch.randperm(pool, generator=g, device=dev)[:Bs]
        sst = torch.randn(pool, E, N, generator=g, device=dev) * 0.5
        s1, s2 = sst.clone(), sst.clone()
        args = (u, delta, A, Bm, Cm, D_, z, db, cu)
        got = _scan_triton.selective_scan_varlen_triton(*args, s1, slots)
        err = None
        if not a.no_ref:
            s1.copy_(sst)
            got = _scan_triton.selective_scan_varlen_triton(*args, s1, slots)
            ref_y = selective_scan_varlen_ref(*args, s2, slots)
            err = max(_err(got, ref_y), _err(s1[slots], s2[slots]))
            del ref_y
        if callable(mamba["selective_scan_fn"]):
            tr = lambda t: t.reshape(Bs, L, -1).transpose(1, 2).contiguous()  # noqa: E731
            mu, md, mz, mB, mC = tr(u), tr(delta), tr(z), tr(Bm), tr(Cm)
            ext = ("selective_scan_fn", lambda: mamba["selective_scan_fn"](
                mu, md, A, mB, mC, D_.float(), mz, db.float(), delta_softplus=True, return_last_state=True))
        else:
            ext = ("selective_scan_fn", mamba["selective_scan_fn"])
        # channels a warp (registers, so warps an SM, against instructions a channel) and the
        # four-step groups that load u, delta and z ahead against the plain loop
        sweep = [(f"BE{be} w{nw} unroll{int(un)}", (lambda be=be, nw=nw, un=un: override(
            _scan_triton.SCAN_CONFIG, BLOCK_E=be, num_warps=nw, UNROLL4=un)))
            for be in (16, 32, 64) for nw in (1, 2) for un in (True, False)]
        nbytes = 4 * T * E * esz + 2 * T * N * esz + 2 * Bs * E * N * 4
        from . import scan_before  # the kernel as last timed (dbd7a74), in the same run
        s3 = sst.clone()
        record("scan_varlen", f"[{T},{E}] N{N}", nbytes,
               lambda: _scan_triton.selective_scan_varlen_triton(*args, s1, slots),
               lambda: selective_scan_varlen_ref(*args, s2, slots), ext=ext, err=err, sweep=sweep,
               before=lambda: scan_before.selective_scan_varlen_triton(*args, s3, slots))
        del u, delta, P, z, Bm, Cm, sst, s1, s2, s3, got

    # ---- selective state update (decode), on an fp32 and on a bf16 state pool
    if want("state_update"):
        for DB, sdt in ((DB, sdt) for DB in a.decode_B for sdt in (torch.float32, torch.bfloat16)):
            u, delta, z = rnd(DB, E, scale=0.7), rnd(DB, E, scale=0.5), rnd(DB, E)
            Bm, Cm = rnd(DB, N), rnd(DB, N)
            pool = DB + DB // 2
            slots = torch.randperm(pool, generator=g, device=dev)[:DB]
            sst = (torch.randn(pool, E, N, generator=g, device=dev) * 0.5).to(sdt)
            s1, s2 = sst.clone(), sst.clone()
            args = (u, delta, A, Bm, Cm, D_, z, db)
            got = _scan_triton.selective_state_update_triton(s1, slots, *args)
            err = None
            if not a.no_ref:
                ref_y = selective_state_update_ref(s2, slots, *args)
                err = max(_err(got, ref_y), _err(s1[slots], s2[slots]))
            if callable(mamba["selective_state_update"]):
                ms_ = sst[:DB].clone()
                ext = ("mamba selective_state_update", lambda: mamba["selective_state_update"](
                    ms_, u, delta, A, Bm, Cm, D_, z, db, dt_softplus=True))
            else:
                ext = ("selective_state_update", mamba["selective_state_update"])
            sweep = [(f"BE{be} w{nw}", (lambda be=be, nw=nw: override(
                _scan_triton.UPDATE_CONFIG, BLOCK_E=be, num_warps=nw)))
                for be in (32, 64, 128) for nw in (1, 2, 4) if be * N // (32 * nw) >= 1]
            nbytes = 4 * DB * E * esz + 2 * DB * N * esz + 2 * DB * E * N * sst.element_size()
            record("state_update", f"B{DB} [{E}] N{N} state {str(sdt)[6:]}", nbytes,
                   lambda: _scan_triton.selective_state_update_triton(s1, slots, *args),
                   lambda: selective_state_update_ref(s2, slots, *args), ext=ext, err=err, sweep=sweep)
            del u, delta, z, Bm, Cm, sst, s1, s2, got

    doc = {"bench": "kernels", "device": torch.cuda.get_device_name(), "host": platform.node(),
           "torch": torch.__version__, "triton": triton.__version__, "dtype": a.dtype,
           "shapes": {"E": E, "N": N, "K": K, "hidden": H, "dt_rank": R, "prefill_seqs": Bs,
                      "prefill_seqlen": L, "prefill_tokens": T, "decode_B": a.decode_B},
           "peak_copy_tbps": PEAK_BPS / 1e12,
           "configs": {"scan": _scan_triton.SCAN_CONFIG, "state_update": _scan_triton.UPDATE_CONFIG,
                       "conv": _conv_triton.CONV_CONFIG, "conv_update": _conv_triton.UPDATE_CONFIG},
           "rows": rows}
    line = json.dumps(doc)
    if a.save:
        out = Path(__file__).resolve().parent / "results" / f"kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
