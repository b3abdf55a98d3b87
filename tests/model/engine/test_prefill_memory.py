"""A prefill step's memory and time follow its real tokens, never (sequences x longest): one long
prompt among many short ones, measured in a fresh interpreter (peak RSS) on the CPU path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from hymba_batch.model.checkpoints import random_model, tiny_config
    from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = random_model(tiny_config(), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    long = torch.randint(3, 32000, (4096,), generator=g).tolist()
    shorts = [torch.randint(3, 32000, (int(n),), generator=g).tolist()
              for n in torch.randint(10, 40, (200,), generator=g)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def run(prompts):
        engine = Engine(model, EngineConfig(max_batch_tokens=8192))
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
        return time.perf_counter() - t0

    run([long[:64]] + shorts[:2])  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_long, t_short = run([long]), run(shorts)
    t_mixed = run([long] + shorts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(grow_mib=(peak - base) / 1024, t_long=t_long, t_short=t_short, t_mixed=t_mixed)))
""")


def test_long_prompt_among_short_ones_is_bounded_in_memory_and_time():
    """4,096 tokens + 200 prompts of 10-40 tokens (two prefill steps of <= 8,192 tokens): the
    padded layout this replaces would hold 201 x 4,096 x 4,224 scores per head (tens of GB); the
    packed path stays under 400 MiB of growth and takes about as long as the two parts alone."""
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["grow_mib"] < 400, got
    assert got["t_mixed"] < 1.5 * (got["t_long"] + got["t_short"]) + 1.0, got
