"""The per-request logits hook on the GPU (pytest -m gpu): under CUDA graphs, with the pinned
host bitmask copied without blocking, the same tokens and log-probabilities as on the CPU for
forced tokens, penalties and min_new_tokens in one mixed batch."""

import numpy as np
import pytest
import torch

from hymba_batch.model import load_model
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
from hymba_batch.pipeline.classify import ForcedTokens

pytestmark = pytest.mark.gpu


def _params():
    return [SamplingParams(max_new_tokens=4, logprobs=True, constraint=ForcedTokens([500, 17, 4242, 9])),
            SamplingParams(max_new_tokens=12, repetition_penalty=1.8, presence_penalty=1.0, frequency_penalty=0.5,
                           ignore_eos=True, logprobs=True),
            SamplingParams(max_new_tokens=12, min_new_tokens=6, logprobs=True),
            SamplingParams(max_new_tokens=12, ignore_eos=True)]


def test_logits_hook_on_cuda_equals_cpu(tiny_ckpt):
    assert torch.cuda.is_available(), "GPU tests need CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides: the same greedy tokens
    torch.backends.cudnn.allow_tf32 = False
    prompts = [[1, 9, 10, 11, 9, 10], [1, 5, 5, 5, 6], [1, 300, 301], [1, 7]]
    cpu = Engine(load_model(tiny_ckpt)).generate(prompts, _params())
    gpu = Engine(load_model(tiny_ckpt, device="cuda", dtype=torch.float32),
                 EngineConfig(memory_budget_bytes=1 << 28, cuda_graphs=True)).generate(prompts, _params())
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids and g.finish_reason == c.finish_reason
        if c.logprobs is not None:
            assert np.allclose(g.logprobs, c.logprobs, atol=2e-3)
