"""Continuous batching: which sequences run in the next step, and how.

A step is either a packed prefill (chunks of waiting or partly prefilled sequences, up to a
token budget; long prompts are split into chunks that carry their conv/SSM state) or a decode
of every running sequence. When the paged pool runs out, the newest sequence is preempted:
its slot and blocks are freed and it is re-queued to be recomputed (prompt + tokens so far),
which yields the same tokens because sampling depends only on (seed, token index).

Admission waits for a worthwhile prefill: while sequences are decoding, new ones are admitted
only when an eighth of the slots is free or the admissible prompts fill half a prefill step.
Otherwise, in a stream of requests that finish one by one, every decode step would be followed
by a prefill step of one or two prompts, paying a whole step's fixed cost for a few tokens.

``max_chunk_tokens`` caps one sequence's chunk in a step. The selective scan runs each sequence's
tokens in order, so a step lasts as long as its longest chunk's scan: capping it keeps a step of
mixed lengths as short as a step of uniform ones (the rest of the long prompt runs in the next
steps, beside other sequences). Measured on the H200 (jobs/bench/results/
engine-chunk-caps-h200-2026-12-04.json, half-size M and L, one run each): with a cap of 1,024,
M 75.1 docs/s (2,048: 72.5; no cap: 39.8 as the run's first workload, 58.8 at full size in an
earlier run) and L 10.9 (2,048: 7.1; no cap: 9.1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .api import SamplingParams
from .cache import KVCache


@dataclass(eq=False)
class Sequence:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens of prompt + output already in the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def pending(self) -> int:
        return self.num_tokens - self.num_cached


@dataclass
class PrefillBatch:
    seqs: list[Sequence]
    starts: list[int]
    chunks: list[list[int]]
    complete: list[bool]  # chunk reaches the end: sample after it


@dataclass
class DecodeBatch:
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, cache: KVCache, max_batch_tokens: int, max_chunk_tokens: int | None = None):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_chunk_tokens = max_chunk_tokens or max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # an ordered set: admission order, O(1) removal
        self.admit_slots = max(1, (cache.shape.num_slots - 1) // 8)
        self.num_preemptions = 0
        self.rejected: list[tuple[Sequence, str]] = []  # requests that can never fit the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        batch = self._prefill()
        if batch is not None:
            return batch
        return self._decode()

    def _chunk(self, batch: PrefillBatch, seq: Sequence, budget: int) -> int:
        n = min(seq.pending, budget, self.max_chunk_tokens)
        if not self.cache.reserve_blocks(seq.slot, seq.num_cached + n):
            return 0
        batch.seqs.append(seq)
        batch.starts.append(seq.num_cached)
        batch.chunks.append(seq.tokens[seq.num_cached:seq.num_cached + n])
        batch.complete.append(n == seq.pending)
        return n

    def _prefill(self) -> PrefillBatch | None:
        batch = PrefillBatch([], [], [], [])
        budget = self.max_batch_tokens
        for seq in self.running:  # continue chunked prefills first: they hold slots
            if seq.pending > 1 and budget > 0:
                budget -= self._chunk(batch, seq, budget)
        if not self._worth_admitting(budget):
            return batch if batch.seqs else None
        while self.waiting and budget > 0:
            slot = self.cache.allocate_slot()
            if slot is None:
                break
            seq = self.waiting[0]
            seq.slot = slot
            used = self._chunk(batch, seq, budget)
            if used == 0:  # no blocks for it now
                self.cache.free(slot)
                seq.slot = None
                if not self.running and not batch.seqs:  # nothing will free up: it never fits
                    self.waiting.popleft()
                    self.rejected.append((seq, f"the cache cannot hold this request ({seq.num_tokens} "
                                               "tokens); raise the engine's memory budget"))
                    continue
                break
            self.waiting.popleft()
            self.running[seq] = None
            budget -= used
        return batch if batch.seqs else None

    def _worth_admitting(self, budget: int) -> bool:
        if not self.waiting or budget <= 0:
            return False
        free = len(self.cache.free_slots)
        if not any(s.pending == 1 for s in self.running) or free >= min(self.admit_slots, len(self.waiting)):
            return True
        tokens = 0
        for i, seq in enumerate(self.waiting):
            if i >= free:
                break
            tokens += seq.pending
            if tokens >= min(budget, self.max_batch_tokens // 2):
                return True
        return False

    def _decode(self) -> DecodeBatch | None:
        ready = [s for s in self.running if s.pending == 1]
        for seq in list(ready):
            if seq.slot is None:  # preempted while making room for an earlier one
                continue
            while not self.cache.reserve_blocks(seq.slot, seq.num_cached + 1):
                victim = next(reversed(self.running))
                self.preempt(victim)
                if victim is seq:
                    break
        ready = [s for s in ready if s.slot is not None]
        return DecodeBatch(ready) if ready else None

    def preempt(self, seq: Sequence) -> None:
        del self.running[seq]
        self.cache.free(seq.slot)
        seq.slot, seq.num_cached = None, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        del self.running[seq]
        self.cache.free(seq.slot)
        seq.slot = None
