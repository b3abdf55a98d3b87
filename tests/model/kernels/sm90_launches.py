"""Compile every Triton kernel launch of an engine run for the H200 (sm_90), on a machine with no
GPU: the compiled kernels' errors (which the interpreter does not see) show up in CI.

Run as a script (``test_compile_sm90.py`` does, in a process without ``TRITON_INTERPRET``): it
forces the fast path on the CPU, replaces Triton's launcher with one that binds and specialises
each launch as it would on an H200 and keeps it (the kernels do not run, their outputs stay
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
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
LAUNCHES: dict[str, tuple] = {}


def _record(self: JITFunction, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202 - JITFunction.run's shape
    """Bind and specialise the launch exactly as ``JITFunction.run`` does on an H200 (ints equal
    to 1 become constexprs, pointers and ints divisible by 16 say so), and keep what it would
    compile."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
    key = repr((self.fn.__qualname__, signature, constexprs, attrs, options))
    LAUNCHES.setdefault(key, (self, signature, constexprs, attrs, options))


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
    compiled: Counter = Counter()
    for fn, sig, consts, attrs, options in LAUNCHES.values():
        name = fn.fn.__qualname__
        try:
            triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=options.__dict__)
        except Exception as e:
            print(f"{name} {sig} {consts} {options}: {type(e).__name__}: {e}", file=sys.stderr)
            raise
        compiled[name] += 1
    print(json.dumps({"target": "cuda sm_90", "compiled": dict(compiled)}))


if __name__ == "__main__":
    main()
