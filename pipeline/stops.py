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

    @classmethod
    def fill_masks(cls, constraints: list["AllOf"], out, rows: list[int]) -> None:  # noqa: ANN001
        """Many rows at once: the maskers' own batched fill where their class has one."""
        groups: dict = {}
        for c, r in zip(constraints, rows):
            batch = getattr(type(c.masker), "fill_masks", None)
            if batch is None:
                c.masker.allowed_mask(out[r])
            else:
                groups.setdefault(batch, ([], []))
                groups[batch][0].append(c.masker)
                groups[batch][1].append(r)
        for batch, (ms, rs) in groups.items():
            batch(ms, out, rs)

    @classmethod
    def advance_all(cls, constraints: list["AllOf"], tokens: list[int]) -> list[str | None]:
        """Many requests at once: the maskers through their batched advance where they have
        one, the watchers one by one; an error message per request."""
        errors: list[str | None] = [None] * len(constraints)
        groups: dict = {}
        for i, (c, t) in enumerate(zip(constraints, tokens)):
            for p in c.parts:
                batch = getattr(type(p), "advance_all", None) if p is c.masker else None
                if batch is not None:
                    groups.setdefault(batch, []).append((i, p, t))
                    continue
                try:
                    p.advance(t)
                except Exception as e:  # noqa: BLE001 - one request's error
                    errors[i] = errors[i] or f"{type(e).__name__}: {e}"
        for batch, items in groups.items():
            for (i, _, _), err in zip(items, batch([p for _, p, _ in items], [t for _, _, t in items])):
                errors[i] = errors[i] or err
        return errors
