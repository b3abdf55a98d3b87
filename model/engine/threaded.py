"""A thread-safe front end to one Engine: several callers (threads) submit lists of requests and
block on their own results, while one background thread steps the engine. Requests from all
callers share the same continuous batch, so the device stays full between callers' lists.

If a step raises (a CUDA error, say), every pending request fails with that error and the
front end stops accepting work: callers see the exception rather than a hang.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from .api import RequestOutput, SamplingParams
from .engine import Engine


class ThreadedEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._futures: dict[int, Future] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="hymba-engine", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine, if one did."""
        return self._error

    def add_prefix(self, token_ids: list[int], parent: int | None = None) -> int:
        """``Engine.add_prefix`` under the lock: a prefix computed once for later requests."""
        with self._cv:
            pid = self.engine.add_prefix(token_ids, parent)
            self._cv.notify()
            return pid

    def release_prefix(self, prefix: int) -> None:
        with self._cv:
            self.engine.release_prefix(prefix)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 prefixes: list[int | None] | None = None, release: tuple[int, ...] = ()) -> list[RequestOutput]:
        """Submit and wait; results in input order. ``prefixes[i]``: prompt i follows that prefix;
        ``release``: prefixes to release once these requests are queued."""
        futures = []
        with self._cv:
            if self._error is not None:
                raise RuntimeError("the engine failed earlier") from self._error
            for prompt, p, pre in zip(prompts, params, prefixes or [None] * len(prompts), strict=True):
                fut: Future = Future()
                self._futures[self.engine.add_request(prompt, p, pre)] = fut
                futures.append(fut)
            for pid in release:
                self.engine.release_prefix(pid)
            self._cv.notify()
        return [f.result() for f in futures]

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.engine.has_unfinished():
                    self._cv.wait()
                try:
                    outs = self.engine.step()
                except BaseException as e:  # fail every waiter; never leave one hanging
                    self._error = e
                    for fut in self._futures.values():
                        fut.set_exception(e)
                    self._futures.clear()
                    return
                done = [(self._futures.pop(o.request_id), o) for o in outs]
            for fut, out in done:
                fut.set_result(out)
