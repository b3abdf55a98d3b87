"""Helpers for the engine tests: a masking constraint whose mask depends on the last token, and
the check that an engine has given every slot and block back."""

from __future__ import annotations

import numpy as np


def assert_all_free(engine) -> None:  # noqa: ANN001 - an Engine
    """Nothing runs, and every slot, block and block reference is back (the scratch ones aside)."""
    c = engine.cache
    assert not engine.scheduler.running and not engine.has_unfinished()
    assert sorted(c.free_blocks) == sorted(set(range(c.shape.num_blocks)) - {c.scratch_block})
    assert len(c.free_slots) == c.shape.num_slots - 1
    assert [r for b, r in enumerate(c.refs) if b != c.scratch_block] == [0] * (c.shape.num_blocks - 1)
    assert not c.blocks_of


class NextResidue:
    """A masking constraint whose mask depends on the last token: the next token must be
    congruent to (last + 1) mod 5. A mask computed before the last token was read breaks it."""

    masks = True

    def __init__(self, vocab: int, limit: int):
        self.vocab, self.last, self.n, self.limit = vocab, 0, 0, limit

    def allowed_mask(self, out: np.ndarray) -> None:
        allowed = np.zeros(out.size * 32, dtype=bool)
        allowed[(self.last + 1) % 5:self.vocab:5] = True
        out[:] = np.packbits(allowed.reshape(-1, 8)[:, ::-1]).view("<u4").view(np.int32)

    def advance(self, token_id: int) -> None:
        if token_id % 5 != (self.last + 1) % 5:
            raise ValueError(f"token {token_id} after {self.last}")
        self.last, self.n = token_id, self.n + 1

    def is_done(self) -> bool:
        return self.n >= self.limit
