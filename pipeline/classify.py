"""Labels with probabilities (``task.kind: classify``): each label's log-likelihood as a
continuation of the row's prompt, a softmax over the labels, and the most likely label.

How it is scored: one engine request per (row, label), its decoding forced to the label's tokens
(``ForcedTokens``, a constraint of the engine's per-request interface) with the sampled tokens'
log-probabilities returned (the model's own distribution, before any mask). The label's
log-likelihood is their sum. All rows' label requests share the engine's continuous batch, so
label continuations are decoded batched; the requests of a row share one prompt, which the actor
prefills once and forks (workers/actor.py). A label's tokens are those the model would write at the start of its answer
(``enrich.label_tokens``). Knows nothing of models.
"""

from __future__ import annotations

import math

import numpy as np

MIN_LABELS, MAX_LABELS = 2, 1000
DEFAULT_CLASSIFY = "Classify the following text. Answer with exactly one of: {labels}."


class ForcedTokens:
    """Allows exactly the given tokens, one after the other, then is done (teacher forcing)."""

    masks = True

    def __init__(self, token_ids: list[int] | tuple[int, ...]):
        if not token_ids:
            raise ValueError("ForcedTokens needs at least one token")
        self.tokens, self.pos = tuple(token_ids), 0

    def allowed_mask(self, out: np.ndarray) -> None:
        t = self.tokens[min(self.pos, len(self.tokens) - 1)]
        out[t // 32] = np.array([1 << (t % 32)], dtype=np.uint32).view(np.int32)[0]

    def advance(self, token_id: int) -> None:
        expected = self.tokens[min(self.pos, len(self.tokens) - 1)]
        if self.pos >= len(self.tokens) or token_id != expected:
            raise ValueError(f"forced token {expected} expected, got {token_id}")
        self.pos += 1

    def is_done(self) -> bool:
        return self.pos >= len(self.tokens)


def check_labels(labels: list[str] | tuple[str, ...]) -> None:
    """ValueError unless 2..1000 distinct non-empty labels."""
    if not MIN_LABELS <= len(labels) <= MAX_LABELS:
        raise ValueError(f"task.labels: {MIN_LABELS} to {MAX_LABELS} labels, got {len(labels)}")
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        raise ValueError("task.labels: every label is a non-empty string")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"task.labels: duplicate labels {dup}")


def label_probs(loglik: list[float]) -> list[float]:
    """Softmax over the labels' total log-likelihoods (float64; sums to 1)."""
    m = max(loglik)
    e = [math.exp(x - m) for x in loglik]
    z = math.fsum(e)
    return [x / z for x in e]
