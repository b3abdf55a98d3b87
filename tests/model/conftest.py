"""Model fixtures: the golden outputs of NVIDIA's implementation and tiny random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# 2 shared cores: one intra-op thread avoids OpenMP oversubscription (20x slower otherwise)
torch.set_num_threads(1)

SHARED = Path(os.environ.get("HYMBA_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"{SHARED} missing: the repo must sit beside ../shared (see README)"
    return SHARED


@pytest.fixture(scope="session")
def golden(shared_dir):
    from safetensors.torch import load_file
    return load_file(str(shared_dir / "golden" / "tiny-a" / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_model(shared_dir):
    from hymba_batch.model import load_model
    return load_model(shared_dir / "golden" / "tiny-a")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from hymba_batch.model.checkpoints import tiny_config, write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config(), seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from hymba_batch.model import load_model
    return load_model(tiny_ckpt)


def _rand_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 32000) -> list[list[int]]:
    """n prompts of BOS + random ids, lengths uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (L - 1,), generator=g).tolist() for L in lens]


@pytest.fixture(scope="session")
def rand_prompts():
    return _rand_prompts


def _teacher_forced(model, prompt: list[int], gen: list[int], **config) -> torch.Tensor:  # noqa: ANN001
    """Logits [len(gen), V] of the prompt's prefill, then of one decode step per ``gen[:-1]``
    token, through one engine's runner (``config``: EngineConfig fields)."""
    from hymba_batch.model.engine import Engine, EngineConfig
    engine = Engine(model, EngineConfig(**{"max_num_seqs": 2, "memory_budget_bytes": 1 << 28} | config))
    slot = engine.cache.allocate_slot()
    engine.cache.reserve_blocks(slot, len(prompt) + len(gen))
    rows = [engine.runner.prefill([slot], [0], [prompt])[0]]
    dev = model.device
    for j, tok in enumerate(gen[:-1]):
        rows.append(engine.runner.decode(torch.tensor([slot], device=dev), torch.tensor([len(prompt) + j], device=dev),
                                         torch.tensor([tok], device=dev))[0])
    return torch.stack(rows).float().cpu()


@pytest.fixture(scope="session")
def teacher_forced():
    """``teacher_forced(model, prompt, gen, **engine_config)``: logits of the prompt's prefill, then
    of one decode step per ``gen[:-1]`` token, through one engine's runner."""
    return _teacher_forced
