"""Engine benchmarks on one GPU (design.md §5): workloads S, M, G, L on a random-weight model of
the real Hymba-1.5B config in bf16, the batch-size-1 path, a Hugging Face transformers Llama
baseline of Hymba's width and depth, and several engines per GPU in separate processes.

    python -m hymba_batch.jobs.bench.engine --workloads S,M,G,L --baselines --actors 1,2,4 \
        --json-out $OUT/engine.json

Workloads (prompts x prompt tokens, new tokens):
  S  2,048 x 1,024, 128 new     summarization, uniform
  M  2,048 mixed, as real datasets are: prompt lengths log-normal with median 570 and p90 1,900
     tokens (mu = ln 570, sigma = 0.94), clipped to [16, 7,000]; new tokens uniform in [16, 256]
     per request (seed 4); mean ~840 prompt and ~137 new tokens, max 7,000
  G  2,048 x 128, 512 new       generation, decode-bound
  L  256 x 7,000, 256 new       long documents

Fixed protocol: seeded random prompts, fixed output lengths (EOS ignored), a warm-up run
(uniform prompts, then a tenth of M: mixed lengths compile kernel variants of their own), the
median of ``--repeats`` timed runs. ``--variants`` reruns each workload on engines with other
settings in the same process (e.g. ``overlap=false``: the host/device overlap off;
``ssm_state_dtype=float32``: the SSM state pools in fp32; ``scan.BLOCK_E=64,scan.UNROLL4=0``:
the prefill scan's launch config). Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import gc
import platform
import statistics
import time
from functools import lru_cache
from pathlib import Path
from queue import Empty

import torch

from hymba_batch.model.checkpoints import random_model
from hymba_batch.model.config import HymbaConfig, real_config_dict
from hymba_batch.model.costs import cache_bytes, decode_flops, prefill_flops, weight_bytes
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams

WORKLOADS = {  # name: (prompts, prompt tokens, new tokens); M: lengths drawn per request
    "S": (2048, 1024, 128),
    "M": (2048, None, None),
    "G": (2048, 128, 512),
    "L": (256, 7000, 256),
}
SEEDS = {"S": 1, "M": 4, "G": 2, "L": 3}


def workload(name: str, scale: float = 1.0) -> tuple[list[list[int]], list[int]]:
    """(prompts, new tokens per prompt) of a workload, seeded."""
    n, plen, new = WORKLOADS[name]
    n = max(1, int(n * scale))
    if plen is not None:
        return prompts_for(n, plen, SEEDS[name]), [new] * n
    g = torch.Generator().manual_seed(SEEDS[name])
    lens = torch.exp(math.log(570) + 0.94 * torch.randn(n, generator=g)).round().clamp(16, 7000).long()
    news = torch.randint(16, 257, (n,), generator=g)
    ids = torch.randint(3, 32000, (int(lens.sum()),), generator=g)
    prompts = [[1] + c.tolist()[1:] for c in ids.split(lens.tolist())]
    return prompts, news.tolist()


def prompts_for(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (n, length), generator=g)
    ids[:, 0] = 1
    return ids.tolist()


def measure_ceilings() -> dict:
    """Measured bf16 matmul rate and device copy bandwidth (the floors' denominators)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        a @ b
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    flops = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() / (time.perf_counter() - t)
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_bf16_flops": flops, "copy_bytes_per_s": bw}


def variant_overrides(variant: str) -> tuple[dict, dict]:
    """'overlap=false,ssm_state_dtype=float32,scan.BLOCK_E=32' -> (EngineConfig fields: bools,
    ints, torch dtypes; SCAN_CONFIG entries of the ``scan.`` keys: ints, 0/1 for the switches).
    ``scan_before=1`` runs the prefill scan kernel as last timed (``scan_before.py``): the
    ``"before"`` entry of the second dict."""
    from hymba_batch.model.kernels import _scan_triton

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine: dict = {}
    scan: dict = {}
    for kv in filter(None, variant.split(",")):
        key, _, val = kv.partition("=")
        if key.startswith("scan."):
            key = key.removeprefix("scan.")
            if key not in _scan_triton.SCAN_CONFIG:
                raise SystemExit(f"--variants: scan.{key} is not a SCAN_CONFIG key ({', '.join(_scan_triton.SCAN_CONFIG)})")
            scan[key] = bool(int(val)) if isinstance(_scan_triton.SCAN_CONFIG[key], bool) else int(val)
        elif key == "scan_before":
            scan["before"] = bool(int(val))
        elif key not in fields:
            raise SystemExit(f"--variants: {key!r} is not an EngineConfig field ({', '.join(sorted(fields))})")
        else:
            engine[key] = (val.lower() == "true" if val.lower() in ("true", "false") else getattr(torch, val)
                           if key.endswith("dtype") else None if val == "none" else int(val))
    return engine, scan


def run_workload(engine: Engine, name: str, prompts: list[list[int]], news: list[int], repeats: int) -> dict:
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in news]
    times = []
    entries = triton_cache_entries()
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        assert [o.completion_tokens for o in outs] == news, "every request must produce its tokens"
    compiled = triton_cache_entries() - entries
    if compiled:
        print(f"WARNING {name}: {compiled} Triton kernel(s) compiled inside the timed runs; the warm-up misses them",
              flush=True)
    dt = statistics.median(times)
    n, lens = len(prompts), [len(p) for p in prompts]
    return {"workload": name, "prompts": n, "prompt_tokens": sum(lens) / n, "new_tokens": sum(news) / n,
            "prompt_tokens_p50_p90_max": [sorted(lens)[n // 2], sorted(lens)[int(n * 0.9)], max(lens)],
            "seconds": dt, "runs": times, "docs_per_s": n / dt, "prompt_tok_per_s": sum(lens) / dt,
            "gen_tok_per_s": sum(news) / dt, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "preemptions": engine.scheduler.num_preemptions, "kernels_compiled_in_timed_runs": compiled}


def triton_cache_entries() -> int:
    """Entries in Triton's on-disk cache: each kernel this process compiles adds one."""
    from triton import knobs

    d = Path(knobs.cache.dir)
    return sum(1 for _ in d.iterdir()) if d.is_dir() else 0


def profile_steps(engine: Engine, out_path: str) -> str:
    """Kernel-level profile of one S prefill step (16 x 1024 tokens), one S decode step (batch
    512, context ~1.2k) and one G decode step (batch 2048, context ~0.3k)."""
    from torch.profiler import ProfilerActivity, profile

    def profiled(title: str) -> str:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        return f"{title}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)

    def until_decode() -> None:
        while any(s.pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        engine.step()  # a first decode step (graph capture for this bucket happens here)

    def loop(title: str, steps: int = 10) -> str:
        """Wall time of consecutive steps against the GPU's kernel time in them: the gap is host work
        the GPU waits for."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / steps
        return f"{title}: {steps} steps, wall {wall * 1e3:.1f} ms/step, GPU kernels {gpu:.1f} ms/step\n"

    tables = []
    for n, plen, title in ((512, 1024, "S"), (2048, 128, "G")):
        for p in prompts_for(n, plen, seed=21):
            engine.add_request(p, SamplingParams(max_new_tokens=8 if title == "S" else 40, ignore_eos=True))
        if title == "S":
            engine.step()  # warm
            torch.cuda.synchronize()
            per_step = engine.config.max_batch_tokens // plen  # prompts of one prefill step
            tables.append(profiled(f"PREFILL STEP ({per_step} x {plen} tokens)"))
            tables.append(loop("PREFILL LOOP (S)", 5))
        until_decode()
        tables.append(profiled(f"DECODE STEP ({title}: batch {n}, context ~{plen + 128 + 2})"))
        if title == "G":
            tables.append(loop("DECODE LOOP (G: batch 2048)"))
        while engine.has_unfinished():
            engine.step()
    text = "\n".join(tables)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    return text


def floors(cfg: HymbaConfig, prompts: list[list[int]], news: list[int], seconds: float, ceil: dict,
           slots: int) -> dict:
    """Compute floor (all FLOPs at the measured matmul rate) and bandwidth floor (each decode step
    reads the weights once and every resident sequence's state + K/V, at the measured copy rate;
    the SSM state in bf16, as NVIDIA's cache and our default keep it; the JSON files up to
    engine-overlap-h200-2026-12-04.json counted it in fp32: a higher floor, so lower ratios)."""
    prefill, decode = lru_cache(None)(lambda p: prefill_flops(cfg, p)), lru_cache(None)(lambda p, m: decode_flops(cfg, p, m))
    flops = sum(prefill(len(p)) + decode(len(p), m) for p, m in zip(prompts, news))
    compute_floor = flops / ceil["matmul_bf16_flops"]
    cb = cache_bytes(cfg, 2)
    n = len(prompts)
    batch = min(n, slots)
    kv_tok = cfg.num_key_value_heads * (cfg.head_dim + cfg.v_head_dim) * 2
    n_swa = sum(not cfg.is_global(p) for p in cfg.producers)
    states = cb.slot - n_swa * (cfg.sliding_window + 1) * kv_tok
    seq_bytes = 0  # every sequence's state + K/V, once per decode step it takes part in
    for p, m in zip(prompts, news):
        ctx = len(p) + m // 2  # mean context over its decode
        seq_bytes += (m - 1) * (states + n_swa * min(ctx, cfg.sliding_window + 1) * kv_tok + cb.per_global_token * ctx)
    steps = sum(m - 1 for m in news) / batch
    bytes_ = steps * weight_bytes(cfg) + seq_bytes
    bw_floor = bytes_ / ceil["copy_bytes_per_s"] * 2  # copy rate counts read + write
    return {"flops": flops, "compute_floor_s": compute_floor, "ratio_to_compute_floor": seconds / compute_floor,
            "decode_bytes": bytes_, "bandwidth_floor_s": bw_floor, "ratio_to_bandwidth_floor": seconds / bw_floor}


def bs1_baseline(model, plen: int, new: int, n: int = 4) -> dict:
    engine = Engine(model, EngineConfig(max_num_seqs=1, memory_budget_bytes=4 << 30))
    prompts = prompts_for(n, plen, seed=7)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"prompts": n, "prompt_tokens": plen, "new_tokens": new, "seconds": dt,
            "gen_tok_per_s": n * new / dt, "docs_per_s": n / dt}


def hf_llama_baseline(plen: int, new: int, n: int, batch: int, cache: str) -> dict:
    """transformers generate on a random Llama of Hymba's width and depth (1.09B params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lcfg = LlamaConfig(hidden_size=1600, num_hidden_layers=32, intermediate_size=5504, num_attention_heads=25,
                       num_key_value_heads=5, vocab_size=32001, max_position_embeddings=8192)
    lcfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(lcfg).to(torch.bfloat16).eval()
    prompts = torch.tensor(prompts_for(n, plen, seed=11), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        if cache == "static":  # compile for the timed shapes (cache length = prompt + new tokens)
            model.generate(prompts[:batch], **kw)
        else:
            model.generate(prompts[:batch, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, n, batch):
            model.generate(prompts[i:i + batch], **kw)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"params": params, "batch": batch, "cache": cache, "prompts": n, "prompt_tokens": plen,
            "new_tokens": new, "seconds": dt, "docs_per_s": n / dt, "gen_tok_per_s": n * new / dt}


def _actor(rank: int, k: int, n: int, plen: int, new: int, barrier, queue) -> None:
    torch.cuda.set_device(0)
    cfg = HymbaConfig.from_dict(real_config_dict())
    model = random_model(cfg, "cuda", torch.bfloat16, seed=rank)
    engine = Engine(model, EngineConfig(memory_fraction=0.9 / k))
    engine.generate(prompts_for(8, 64, seed=99), SamplingParams(max_new_tokens=4, ignore_eos=True))
    prompts = prompts_for(n, plen, seed=rank)
    barrier.wait()
    torch.cuda.synchronize()
    t0 = time.time()
    engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    torch.cuda.synchronize()
    queue.put((rank, t0, time.time(), engine.cache.shape.num_slots, torch.cuda.max_memory_allocated()))


def actors_per_gpu(k: int, total: int, plen: int, new: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_actor, args=(r, k, total // k, plen, new, barrier, queue)) for r in range(k)]
    for p in procs:
        p.start()
    res = []
    while len(res) < k:  # a process that dies (out of memory, say) fails the run instead of hanging it
        try:
            res.append(queue.get(timeout=5))
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{len(dead)} of {k} engine processes died (exit codes {dead})")
    for p in procs:
        p.join()
    start, end = min(r[1] for r in res), max(r[2] for r in res)
    n = (total // k) * k
    return {"actors": k, "prompts": n, "seconds": end - start, "docs_per_s": n / (end - start),
            "gen_tok_per_s": n * new / (end - start), "slots_per_actor": [r[3] for r in res],
            "peak_mem_gib_per_actor": [r[4] / 2**30 for r in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="S,G,L")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's prompts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--hf-caches", default="", help="transformers cache per workload, e.g. S=dynamic,G=static "
                    "(default: both, the faster one counts)")
    ap.add_argument("--actors", default="", help="comma list of engines per GPU, e.g. 1,2,4,8")
    ap.add_argument("--actor-prompts", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the engine's (what a job gets)")
    ap.add_argument("--max-chunk-tokens", type=int, default=None,
                    help="engine's per-sequence chunk cap (0: none; default: the engine's default)")
    ap.add_argument("--chunk-caps", default="", help="comma list: rerun each workload with these per-sequence "
                    "chunk caps (0: none); results named e.g. M@1024")
    ap.add_argument("--variants", default="", help="';'-separated EngineConfig overrides, each rerunning every "
                    "workload on a fresh engine after the default one, e.g. 'overlap=false;ssm_state_dtype=float32' "
                    "(results named e.g. G/overlap=false): a change's gain in the same run")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--profile", default="", help="write a kernel profile of a prefill and two decode steps here")
    a = ap.parse_args()
    cfg = HymbaConfig.from_dict(real_config_dict())
    result: dict = {"bench": "engine", "hardware": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "python": platform.python_version(), "model": "random weights, real Hymba-1.5B config, bf16",
                    "settings": vars(a)}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    result["ceilings"] = ceil = measure_ceilings()
    rows = []

    def dump() -> None:  # after every section: a killed run still leaves what it measured
        if a.json_out:
            os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
            with open(a.json_out, "w") as f:
                f.write(json.dumps(result) + "\n")

    if a.workloads:
        model = random_model(cfg, "cuda", torch.bfloat16)
        base = {} if a.max_batch_tokens is None else {"max_batch_tokens": a.max_batch_tokens}
        if a.max_chunk_tokens is not None:
            base["max_chunk_tokens"] = a.max_chunk_tokens or None
        names = a.workloads.split(",")
        floor_cache: dict[str, dict] = {}
        engine = None
        from hymba_batch.model.kernels import _scan_triton

        from . import scan_before
        scan_default, scan_now = dict(_scan_triton.SCAN_CONFIG), _scan_triton.selective_scan_varlen_triton
        for variant in [""] + [v for v in a.variants.split(";") if v]:
            engine = None
            gc.collect()  # the last variant's engine: its CUDA graphs and caches sit in reference cycles
            torch.cuda.empty_cache()
            engine_kw, scan_kw = variant_overrides(variant)
            before = scan_kw.pop("before", False)
            _scan_triton.SCAN_CONFIG.update(scan_default | scan_kw)  # compiled in the warm-up
            _scan_triton.selective_scan_varlen_triton = scan_before.selective_scan_varlen_triton if before else scan_now
            engine = Engine(model, EngineConfig(**base | engine_kw))
            result.setdefault("engine", {})[variant or "default"] = {
                "slots": engine.cache.shape.num_slots, "blocks": engine.cache.shape.num_blocks,
                "cache_gib": engine.cache.nbytes() / 2**30}
            engine.generate(prompts_for(64, 256, seed=5), SamplingParams(max_new_tokens=16, ignore_eos=True))
            # kernels compile per shape class: chunked prefills over a cached history appear only with
            # mixed lengths (a first M run measured 45.7 docs/s against 79.0 in the same run after it)
            # and decode kernels per batch bucket: M's outputs end at every length, so its decode
            # batch passes through buckets S and G never reach (its first run: 25.8 s against 23.7 in
            # the same run once another engine had compiled them, all of it in decode; 2026-12-05)
            t = time.perf_counter()
            warm, warm_news = workload("M", 0.1)
            engine.generate(warm, [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in warm_news])
            if engine.runner.graphs is not None:
                engine.runner.graphs.capture_all()
            torch.cuda.synchronize()
            result.setdefault("warmup_mixed_s", {})[variant or "default"] = time.perf_counter() - t
            if a.profile and not variant:
                print(profile_steps(engine, a.profile)[-9000:])
            default_cap = engine.scheduler.max_chunk_tokens
            runs = [(name, None) for name in names] + [(name, int(c)) for name in names for c in a.chunk_caps.split(",") if c]
            for name, cap in runs:
                prompts, news = workload(name, a.scale)
                engine.stats.update(prefill_s=0.0, decode_s=0.0, prefill_tokens=0, decode_tokens=0, steps=0)
                engine.scheduler.max_chunk_tokens = (cap or engine.scheduler.max_batch_tokens) if cap is not None else default_cap
                r = run_workload(engine, name, prompts, news, a.repeats)
                r["max_chunk_tokens"] = engine.scheduler.max_chunk_tokens
                r["variant"] = variant or "default"
                if name not in floor_cache:  # the floors depend on the workload only (ratios: x seconds)
                    floor_cache[name] = floors(cfg, prompts, news, 1.0, ceil, engine.cache.shape.num_slots)
                f = dict(floor_cache[name])
                f["ratio_to_compute_floor"] *= r["seconds"]
                f["ratio_to_bandwidth_floor"] *= r["seconds"]
                r.update(f)
                name = (name if cap is None else f"{name}@{cap}") + (f"/{variant}" if variant else "")
                r["engine_stats"] = dict(engine.stats)  # summed over the repeats
                result[name] = r
                rows.append((name, f"{r['docs_per_s']:.1f} docs/s", f"{r['gen_tok_per_s']:.0f} gen tok/s",
                             f"{r['prompt_tok_per_s']:.0f} prompt tok/s", f"x{r['ratio_to_compute_floor']:.2f} compute floor",
                             f"x{r['ratio_to_bandwidth_floor']:.2f} bw floor", f"{r['peak_mem_gib']:.1f} GiB"))
                print(*rows[-1], sep=" | ", flush=True)
                dump()
        _scan_triton.SCAN_CONFIG.update(scan_default)
        _scan_triton.selective_scan_varlen_triton = scan_now
        if a.baselines:
            result["bs1_G"] = bs1_baseline(model, 128, 512)
            rows.append(("bs1 G", f"{result['bs1_G']['gen_tok_per_s']:.1f} gen tok/s"))
            print(*rows[-1], sep=" | ", flush=True)
            dump()
        del engine, model
        gc.collect()  # the engine's CUDA graphs and caches sit in reference cycles
        torch.cuda.empty_cache()
    if a.baselines:
        hf_caches = dict(kv.split("=") for kv in a.hf_caches.split(",")) if a.hf_caches else {}
        for name in ("S", "G"):
            _, plen, new = WORKLOADS[name]
            best = None
            for cache in [hf_caches[name]] if name in hf_caches else ("dynamic", "static"):
                try:
                    r = hf_llama_baseline(plen, new, n=128, batch=128, cache=cache)
                except Exception as e:  # recorded, not hidden: the JSON says which setting failed
                    r = {"cache": cache, "error": repr(e)[:300]}
                result.setdefault("hf_llama", {}).setdefault(name, []).append(r)
                if "gen_tok_per_s" in r and (best is None or r["gen_tok_per_s"] > best["gen_tok_per_s"]):
                    best = r
            if best and name in result:
                result[f"ratio_vs_hf_{name}"] = result[name]["gen_tok_per_s"] / best["gen_tok_per_s"]
                rows.append((f"HF {name}", f"{best['gen_tok_per_s']:.0f} gen tok/s ({best['cache']})",
                             f"ours x{result[f'ratio_vs_hf_{name}']:.1f}"))
                print(*rows[-1], sep=" | ", flush=True)
            dump()
        if "bs1_G" in result and "G" in result:
            result["ratio_vs_bs1_G"] = result["G"]["gen_tok_per_s"] / result["bs1_G"]["gen_tok_per_s"]
    if a.actors:
        plen, new = WORKLOADS["S"][1:]
        for k in (int(x) for x in a.actors.split(",")):
            try:
                r = actors_per_gpu(k, a.actor_prompts, plen, new)
            except RuntimeError as e:  # recorded, and the sweep goes on
                r = {"actors": k, "error": str(e)}
                result.setdefault("actors_per_gpu", []).append(r)
                print(f"{k} actors | {e}", flush=True)
                dump()
                continue
            result.setdefault("actors_per_gpu", []).append(r)
            rows.append((f"{k} actors", f"{r['docs_per_s']:.1f} docs/s aggregate"))
            print(*rows[-1], sep=" | ", flush=True)
            dump()
    print("\n".join(" | ".join(r) for r in rows))
    dump()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
