"""The whole model on the fast kernels, wired as the engine runs them: NVIDIA's fp32 golden logits
through an engine's prefill and decode steps with every Triton kernel under the interpreter (CPU),
as ``test_fp32_fast_kernels_match_golden`` does compiled on the GPU. Catches a kernel that passes
its own test but is called with the model's real strides or shapes wrongly."""

from __future__ import annotations

import pytest
import torch

from hymba_batch.model import load_model
from hymba_batch.model.kernels import backend


@pytest.mark.parametrize("i", [5])  # 72 tokens: past the window + meta tokens
def test_fp32_fast_kernels_match_golden_interpreter(kernel_device, shared_dir, golden, teacher_forced, i):
    model = load_model(shared_dir / "golden" / "tiny-a", device=kernel_device, dtype=torch.float32)
    prompt, gen = golden[f"prompt{i}.input_ids"].tolist(), golden[f"prompt{i}.gen_ids"].tolist()
    with backend.force("fast"):
        assert backend.use_fast(torch.zeros(1, device=kernel_device))
        got = teacher_forced(model, prompt, gen[:8])[:, golden["vocab_columns"]]
    want = golden[f"prompt{i}.uncached_gen_logits"][:8]
    assert (got - want).abs().max() <= 1e-4
