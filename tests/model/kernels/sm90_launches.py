"""Compile every Triton kernel launch of an engine run for the H200 (sm_90), on a machine with no
GPU: the compiled kernels' errors (which the interpreter does not see) show up in CI.

Run as a script (``test_compile_sm90.py`` does, in a process without ``TRITON_INTERPRET``): it
forces the fast path on the CPU, replaces Triton's launcher with one that records each launch's
argument types, constexprs and launch options (the kernels do not run, their outputs stay
unset), drives an engine of the real Hymba widths (4 layers, bf16) through chunked prefills over
sliding-window rings and paged blocks, decodes and a forked prefix, then compiles each distinct
launch with Triton's ahead-of-time compiler for ``cuda`` arch 90 (its ``ptxas`` included). Prints
one JSON line last: the launches compiled, per kernel."""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

LAUNCHES: dict[tuple, tuple] = {}


def _record(self: JITFunction, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202 - JITFunction.run's shape
    names = self.arg_names
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig, consts = {}, {}
    for p in self.params:
        v = bound[p.name] if p.name in bound else p.default
        t = "constexpr" if p.is_constexpr else mangle_type(v)
        sig[p.name] = t
        if t == "constexpr":
            consts[p.name] = v
    key = (self.fn.__qualname__, tuple(sig.items()), tuple(consts.items()), tuple(sorted(options.items())))
    LAUNCHES.setdefault(key, (self, sig, consts, options))


def drive_engine() -> None:
    from hymba_batch.model.checkpoints import random_model
    from hymba_batch.model.config import HymbaConfig, real_config_dict
    from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
    from hymba_batch.model.kernels import backend

    backend.use_fast = lambda x: True  # the dispatchers read it through the module
    cfg = HymbaConfig.from_dict(real_config_dict() | {
        "num_hidden_layers": 4, "global_attn_idx": [0, 3], "kv_reuse_group": [[1, 2]], "layer_type": ["h"] * 4,
        "conv_dim": {str(i): 3200 for i in range(4)}, "sliding_window": 48})
    model = random_model(cfg, "cpu", torch.bfloat16)
    engine = Engine(model, EngineConfig(max_batch_tokens=96, max_chunk_tokens=40, memory_budget_bytes=256 << 20))
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (5, 70, 130, 17)]
    engine.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
    prefix = engine.add_prefix(prompts[2][:100])
    engine.generate([[7, 8, 9], [10] * 60], SamplingParams(max_new_tokens=2, ignore_eos=True), prefix=prefix)


def main() -> None:
    JITFunction.run = _record
    drive_engine()
    target = GPUTarget("cuda", 90, 32)
    compiled: Counter = Counter()
    for (name, *_), (fn, sig, consts, options) in LAUNCHES.items():
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=options)
        except Exception as e:
            print(f"{name} {sig} {consts} {options}: {type(e).__name__}: {e}", file=sys.stderr)
            raise
        compiled[name] += 1
    print(json.dumps({"target": "cuda sm_90", "compiled": dict(compiled)}))


if __name__ == "__main__":
    main()
