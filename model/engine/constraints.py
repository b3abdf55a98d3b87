"""Per-request decoding constraints: the interface the engine sees (design.md §3).

A constraint is a small object a caller attaches to one request (``SamplingParams.constraint``).
The engine never knows what it stands for (a JSON schema's grammar, forced label tokens, stop
strings): it only asks, once per sampling step of that request,

- ``allowed_mask(out)``: write the tokens allowed next as bits into ``out``, one row of an int32
  bitmask (numpy, ``[ceil(vocab / 32)]``; bit ``t % 32`` of word ``t // 32`` set = token ``t``
  allowed). The engine copies the rows to the device and masks that request's logits there,
  inside the batched sampling step; a constraint with ``masks = False`` is never asked (a watcher,
  such as a stop-string detector).
- ``advance(token_id)``: the token sampled for the request, after sampling (on the host);
- ``is_done()``: whether the request is complete (it then finishes with reason ``stop``).

A class may also offer classmethods that serve many requests at once (a grammar library working
on several threads): ``fill_masks(constraints, out, rows)`` and ``advance_all(constraints,
tokens) -> list[str | None]`` (an error message per constraint, None when it took its token);
the engine uses them for the requests of a step whose constraints share that class. Requests without a constraint pay
nothing. The interface is a Protocol: implementers (``pipeline/``, ``workers/``) need not import
this module, so a grammar library is never imported by the engine.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TokenConstraint(Protocol):
    masks: bool  # False: never asked for a mask (it only watches the tokens)

    def allowed_mask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into ``out`` (int32 ``[ceil(vocab/32)]``, zeroed)."""

    def advance(self, token_id: int) -> None:
        """Take the token just sampled for this request."""

    def is_done(self) -> bool:
        """The request is complete: finish it with reason ``stop``."""


def bitmask_words(vocab: int) -> int:
    """int32 words of one row of a token bitmask."""
    return (vocab + 31) // 32


def fill_rows(constraints: list[Any], out: np.ndarray) -> None:
    """Fill row i of ``out`` for ``constraints[i]`` (zeroed first), batching rows whose class has
    a ``fill_masks`` classmethod."""
    out[:len(constraints)] = 0
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(constraints):
        batch = getattr(type(c), "fill_masks", None)
        if batch is None:
            c.allowed_mask(out[i])
        else:
            groups.setdefault(batch, []).append(i)
    for batch, rows in groups.items():
        batch([constraints[i] for i in rows], out, rows)



def advance_rows(constraints: list[Any], tokens: list[int]) -> list[str | None]:
    """Give each constraint its sampled token; an error message per constraint (None: fine),
    batching constraints whose class has an ``advance_all`` classmethod."""
    errors: list[str | None] = [None] * len(constraints)
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(constraints):
        batch = getattr(type(c), "advance_all", None)
        if batch is not None:
            groups.setdefault(batch, []).append(i)
            continue
        try:
            c.advance(tokens[i])
        except Exception as e:  # noqa: BLE001 - a constraint's failure is its request's error
            errors[i] = f"{type(e).__name__}: {e}"
    for batch, rows in groups.items():
        try:
            got = batch([constraints[i] for i in rows], [tokens[i] for i in rows])
        except Exception as e:  # noqa: BLE001
            got = [f"{type(e).__name__}: {e}"] * len(rows)
        for i, err in zip(rows, got):
            errors[i] = err
    return errors
