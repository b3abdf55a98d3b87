"""Stop strings: a request ends at the first occurrence of any of them, found across token
boundaries, and its text is cut before it.

``StopStrings`` is a watcher for the engine's per-request constraint interface
(model/engine/constraints.py; ``masks = False``: it never masks, it only watches): after each
sampled token it decodes the last few tokens (enough to hold the longest stop string even when
every character is a byte token) and looks for the stop strings there, so the engine stops the
request in the step its stop string completes. ``cut_at_stop`` cuts the final text. Knows
nothing of models.
"""

from __future__ import annotations

from typing import Callable

MAX_STOPS = 8


class StopStrings:
    """Watches one request's tokens for its stop strings."""

    masks = False

    def __init__(self, stops: tuple[str, ...], decode: Callable[[list[int]], str]):
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops, self.decode = stops, decode
        self.window = 4 * max(len(s) for s in stops) + 4  # a character is at most 4 byte tokens
        self.ids: list[int] = []
        self.done = False

    def allowed_mask(self, out) -> None:  # noqa: ANN001 - never called: masks is False
        raise NotImplementedError("StopStrings does not mask tokens")

    def advance(self, token_id: int) -> None:
        self.ids.append(token_id)
        tail = self.decode(self.ids[-self.window:])
        self.done = any(s in tail for s in self.stops)

    def is_done(self) -> bool:
        return self.done


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(``text`` cut before the first occurrence of any stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class AllOf:
    """Several constraints as one: at most one masks; done when any is done."""

    def __init__(self, parts: list):  # noqa: ANN001 - objects of the constraint interface
        maskers = [p for p in parts if p.masks]
        if len(maskers) > 1:
            raise ValueError("at most one masking constraint per request")
        self.parts, self.masker = parts, maskers[0] if maskers else None
        self.masks = self.masker is not None

    def allowed_mask(self, out) -> None:  # noqa: ANN001 - a numpy int32 row
        assert self.masker is not None
        self.masker.allowed_mask(out)

    def advance(self, token_id: int) -> None:
        for p in self.parts:
            p.advance(token_id)

    def is_done(self) -> bool:
        return any(p.is_done() for p in self.parts)
