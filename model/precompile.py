"""Ahead-of-time compile of the engine's Triton kernels for a GPU architecture, on a machine with
no GPU (an image build, a CI runner): the compiled kernels land in Triton's cache
(``TRITON_CACHE_DIR``) under the keys a run on that GPU looks up, so a fresh node skips the
compiles (H200, 2026-12-05: 49.0 s to a first batch with an empty cache, 23.2 s with this
module's cache (its launchers not yet built), 16.7 s with a warm one).

How: the fast path is forced on the CPU and Triton's launcher is replaced by one that binds and
specialises each launch as ``JITFunction.run`` does on the target (ints equal to 1 become
constexprs, pointers and ints divisible by 16 say so) and keeps it without running it. An engine
of the real Hymba widths (four layers: a global producer, a sliding-window producer, consumers)
runs, with its matrix products stubbed (their outputs are never read), a mixed-length workload
whose prefill steps hold one to dozens of sequences and chunks over cached histories in rings and
paged blocks, a forked prefix, and one decode step at every CUDA-graph batch bucket; twice, on a
small cache and on a larger one (some launch choices follow the cache's shape). Each distinct
launch is then compiled by Triton's compiler for the target, which stores it in the cache.

Triton versions that build a small C launcher per kernel signature with the node's C compiler
(3.6, torch 2.11's) get those built too (``build_launchers``), where a libcuda.so.1 can be found.
Not covered: shapes a job reaches that this workload does not (they compile at first use, as
before). ``seed_cache`` copies a precompiled cache into a node's cache without replacing entries.

    python -m hymba_batch.model.precompile [--arch 90] [--quick]     # prints one JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def recorded_launches(arch: int) -> Iterator[dict]:
    """Inside the block every Triton launch is recorded (bound and specialised for cuda ``arch``),
    not run; the dict maps a launch's key to (kernel, signature, constexprs, attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    launches: dict[str, tuple] = {}
    binders: dict = {}

    def record(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202 - JITFunction.run's shape
        # the options JITFunction.run adds before it binds (they are part of the cache key)
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.6 has the first only
            if hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = repr((self.fn.__qualname__, signature, constexprs, attrs, options))
        launches.setdefault(key, (self, signature, constexprs, attrs, options))

    real = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real


@contextlib.contextmanager
def _fast_path_without_products() -> Iterator[None]:
    """The fast kernels on the CPU, and matrix products that return unset tensors of the right
    shape (the recorded kernels never run: their inputs' values do not matter)."""
    import torch.nn.functional as F

    from .kernels import backend

    real_use_fast, real_linear = backend.use_fast, F.linear

    def linear(x, weight, bias=None):  # noqa: ANN001, ANN202
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)

    backend.use_fast, F.linear = (lambda x: True), linear
    try:
        yield
    finally:
        backend.use_fast, F.linear = real_use_fast, real_linear


# (max_num_seqs, cache budget, prompts): a small engine and one whose decode buckets reach
# multiples of 256 like a GPU engine's (a kernel's variants follow the cache's shape too)
ENGINES = {"small": (64, 1 << 30, 48), "large": (512, 5 << 29, 160)}


def drive_engine(dtype: torch.dtype = torch.bfloat16, which: str = "small") -> None:
    """Run the workload described in the module docstring on one engine of ``ENGINES`` (launches
    recorded by the caller)."""
    from .checkpoints import random_model
    from .config import HymbaConfig, real_config_dict
    from .engine import Engine, EngineConfig, SamplingParams
    from .engine.runner import decode_buckets

    layers = 4
    cfg = HymbaConfig.from_dict(real_config_dict() | {
        "num_hidden_layers": layers, "global_attn_idx": [0, 3], "kv_reuse_group": [[1, 2]],
        "layer_type": ["h"] * layers, "conv_dim": {str(i): 3200 for i in range(layers)}})
    max_seqs, budget, n = ENGINES[which]
    g = torch.Generator().manual_seed(0)
    with _fast_path_without_products():
        model = random_model(cfg, "cpu", dtype)
        engine = Engine(model, EngineConfig(max_num_seqs=max_seqs, memory_budget_bytes=budget, expected_context=256))
        lens = torch.exp(6.3 + 1.0 * torch.randn(n, generator=g)).round().clamp(1, 3000).long().tolist()
        prompts = [[1] + torch.randint(3, 32000, (max(0, L - 1),), generator=g).tolist() for L in lens]
        news = torch.randint(1, 6, (n,), generator=g).tolist()
        engine.generate(prompts, [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in news])
        shared = engine.add_prefix(prompts[0][:300] + [5] * 300)
        engine.generate([[7, 8, 9], [10] * 40], SamplingParams(max_new_tokens=2, ignore_eos=True), prefix=shared)
        # the CUDA-graph path captures one decode per batch bucket (runner.DecodeGraphs): the same
        # eager call on the scratch slot, at every bucket size
        runner, scratch = engine.runner, engine.cache.scratch_slot
        top = engine.cache.shape.num_slots - 1
        for size in decode_buckets(top):
            runner._decode_eager(torch.full((size,), scratch, dtype=torch.long), torch.zeros(size, dtype=torch.long),
                                 torch.zeros(size, dtype=torch.long))


def precompile(arch: int = 90, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> dict:
    """Record the workload's launches and compile each for cuda ``arch`` into Triton's cache.
    Returns {"compiled": {kernel: variants}, "seconds": ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = time.perf_counter()
    with recorded_launches(arch) as launches:
        for which in ["small"] if quick else list(ENGINES):
            drive_engine(dtype, which)
    target = GPUTarget("cuda", arch, 32)
    compiled: Counter = Counter()
    kernels = []
    for fn, sig, consts, attrs, options in launches.values():
        try:
            kernels.append(triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__))
        except Exception as e:
            raise RuntimeError(f"{fn.fn.__qualname__} {sig} {consts} {options}: {type(e).__name__}: {e}") from e
        compiled[fn.fn.__qualname__] += 1
    return {"arch": arch, "compiled": dict(compiled), "variants": sum(compiled.values())} \
        | build_launchers(kernels) | {"seconds": time.perf_counter() - t}


def build_launchers(kernels: list) -> dict:
    """Build and cache the C launcher of each compiled kernel where the installed Triton makes one
    per signature (``triton.backends.nvidia.driver.make_launcher``: 3.6 does, later versions launch
    through one generic function). Otherwise a fresh node builds them at first launch: a cache
    precompiled without them still cost 8.2 s in engine start and first batch against 2.0 s for a
    warm one, with no kernel compiled (H200, pipeline-cold-start-h200-2026-12-05.json). They link
    libcuda.so.1, present on a GPU node even with CUDA hidden; elsewhere ``TRITON_LIBCUDA_PATH``
    names a folder holding one. Returns {"launchers": built} or, where none can be built, the
    reason under "launchers_skipped"."""
    from triton.backends.nvidia import driver as nv

    if not hasattr(nv, "make_launcher"):
        return {"launchers": 0, "launchers_skipped": "this Triton has no per-kernel launchers"}
    try:
        nv.CudaUtils()  # the driver's own helper module, built into the same cache
        for k in kernels:
            nv.CudaLauncher(k.src, k.metadata)
    except (AssertionError, ImportError, RuntimeError, OSError) as e:  # no libcuda.so.1, no C compiler
        return {"launchers": 0, "launchers_skipped": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    return {"launchers": len(kernels)}


def seed_cache(seed: str | Path, cache: str | Path) -> int:
    """Copy the entries of a precompiled Triton cache ``seed`` that ``cache`` lacks (each through a
    temporary directory renamed into place, so a reader never sees half an entry); returns how
    many were copied."""
    seed, cache = Path(seed), Path(cache)
    if not seed.is_dir():
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    copied = 0
    for entry in seed.iterdir():
        if not entry.is_dir() or (cache / entry.name).exists():
            continue
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".seed-"))
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, cache / entry.name)
            copied += 1
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100, H200)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="the small engine's workload only (tests)")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("precompile needs Triton's compiler: unset TRITON_INTERPRET")
    res = precompile(a.arch, getattr(torch, a.dtype), a.quick)
    res["cache"] = os.environ.get("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
