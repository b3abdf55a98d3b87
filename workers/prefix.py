"""A job's shared prompt prefix, computed once per engine (issue 14 item 7).

Every row of a job usually starts with the same tokens: the chat template's header, the
system message, the instruction, few-shot examples. ``SharedPrefix`` finds them where tokens
meet the engine: the longest common token prefix of the prompts seen so far (each unit's
prompts, together with the prefix in use), kept as one engine prefix (``Engine.add_prefix``)
that every request forks from. The prefix only ever shrinks: a unit whose prompts diverge
earlier replaces it with the shorter common part, so after the first few units it is the
template's fixed head. It is in token space, so a row's tokens are exactly what they would be
without sharing (the fork only skips recomputing them).

Thread-safe: units in flight on one actor run in different threads. A replaced prefix is
released once the units using it have added their requests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol


class PrefixEngine(Protocol):
    def add_prefix(self, token_ids: list[int], parent: int | None = None) -> int: ...
    def release_prefix(self, prefix: int) -> None: ...


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix every sequence of ``seqs`` starts with."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


@dataclass
class _Held:
    tokens: list[int]
    pid: int
    users: int = 0
    retired: bool = False


class SharedPrefix:
    """The actor's current shared prefix; ``split`` a batch of prompts against it."""

    def __init__(self, engine: PrefixEngine, min_tokens: int = 32) -> None:
        self.engine, self.min_tokens = engine, min_tokens
        self._lock = threading.Lock()
        self._cur: _Held | None = None
        self.registered = 0  # prefixes computed so far (a test and log figure)

    def split(self, prompts: list[list[int]]) -> tuple[_Held | None, list[list[int]]]:
        """(the prefix to start from, or None; the prompts after it). Call ``done`` with the
        handle once the requests are added."""
        if not prompts:
            return None, prompts
        with self._lock:
            cur = self._cur
            n = common_prefix_len(prompts + ([cur.tokens] if cur else []))
            n = min(n, min(len(p) for p in prompts) - 1)  # every request keeps >= 1 own token
            if cur is None or n != len(cur.tokens):
                if n < self.min_tokens:
                    return None, prompts
                if cur is not None:
                    self._retire(cur)
                cur = self._cur = _Held(list(prompts[0][:n]), self.engine.add_prefix(prompts[0][:n]))
                self.registered += 1
            cur.users += 1
            return cur, [p[n:] for p in prompts]

    def done(self, held: _Held | None) -> None:
        """The requests that ``split`` served have been added (or failed to be)."""
        if held is None:
            return
        with self._lock:
            held.users -= 1
            if held.retired and held.users == 0:
                self.engine.release_prefix(held.pid)

    def _retire(self, held: _Held) -> None:
        held.retired = True
        if held.users == 0:
            self.engine.release_prefix(held.pid)

    def close(self) -> None:
        """Let the current prefix go (freed once no unit uses it)."""
        with self._lock:
            if self._cur is not None:
                self._retire(self._cur)
                self._cur = None
