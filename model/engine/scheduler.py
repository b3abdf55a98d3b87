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

Prefixes (design.md §3, "forking a sequence"): a ``Prefix`` is computed by a sequence like any
other (queued, prefilled in chunks, preemptible) that samples nothing; once complete its slot is
pinned. A sequence that starts from a prefix waits until the prefix is pinned, then takes a slot
forked from it (``KVCache.fork``) and prefills only the tokens after it. A prefix lives while it
has holders (its owner, and queued sequences that have not forked yet); when the last lets go its
slot is freed. A sequence whose prefix is gone (preempted after the prefix was freed) prefills
its whole prompt, which gives the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .api import SamplingParams
from .cache import KVCache


@dataclass(eq=False)
class Prefix:
    """Token ids whose state is computed once and forked into the sequences that start with them."""

    prefix_id: int
    tokens: list[int]
    holds: int = 1           # the owner, plus queued sequences that will fork from it
    slot: int | None = None  # pinned once computed
    freed: bool = False      # no holder left (or it never fit): sequences prefill it themselves
    owned: bool = True       # its owner has not released it yet

    @property
    def ready(self) -> bool:
        return self.slot is not None


@dataclass(eq=False)
class Sequence:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens of prompt + output already in the cache
    logprobs: list[float] = field(default_factory=list)  # per output token, when params.logprobs
    prefix: Prefix | None = None    # the prompt starts with these tokens: fork from them
    computes: Prefix | None = None  # this sequence computes that prefix (and samples nothing)
    holds_prefix: bool = False      # counted in ``prefix.holds`` until it forks
    finished: bool = False          # done (its slot freed); a decode queued ahead drops its token

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
        self.forked_tokens = 0  # prompt tokens taken from a prefix instead of being prefilled
        self.pinned: dict[Prefix, None] = {}  # computed prefixes holding a slot
        self.max_prefix_slots = (cache.shape.num_slots - 2) // 2  # of the usable slots (not the scratch)
        self.lookahead = 4 * cache.shape.num_slots  # waiting sequences looked past per step

    def add(self, seq: Sequence) -> None:
        if seq.computes is not None and self.max_prefix_slots == 0:  # too few slots to pin one
            seq.computes.freed = True
            seq.computes.owned = False
            return
        if seq.prefix is not None and not seq.prefix.freed:
            seq.prefix.holds += 1
            seq.holds_prefix = True
        self.waiting.append(seq)

    # ---- prefixes -----------------------------------------------------------------------------
    def release(self, prefix: Prefix, owner: bool = False) -> None:
        """One holder lets go (``owner``: the one that added it); the last one frees its slot."""
        prefix.holds -= 1
        prefix.owned = prefix.owned and not owner
        if prefix.holds <= 0 and not prefix.freed:
            prefix.freed = True
            if prefix.slot is not None:
                self.cache.free(prefix.slot)
                del self.pinned[prefix]
                prefix.slot = None

    def pin(self, seq: Sequence) -> None:
        """``seq`` finished computing its prefix: its slot becomes the prefix's."""
        p = seq.computes
        assert p is not None and seq.pending == 0
        del self.running[seq]
        if seq.holds_prefix:
            self._let_go(seq)
        if p.freed:  # nobody holds it any more
            self.cache.free(seq.slot)
        else:
            p.slot = seq.slot
            self.pinned[p] = None
        seq.slot = None

    def drop(self, seq: Sequence) -> None:
        """A rejected sequence: its prefix hold, and a prefix it would compute, go."""
        if seq.holds_prefix:
            self._let_go(seq)
        if seq.computes is not None and not seq.computes.freed:
            seq.computes.freed = True

    def _let_go(self, seq: Sequence) -> None:
        seq.holds_prefix = False
        self.release(seq.prefix)

    def _must_wait(self, seq: Sequence, held: int) -> bool | None:
        """True: ``seq`` waits for its prefix to be computed, or (computing a prefix itself) for
        prefix slots to come back; None: it computes a prefix that no slot will come back for."""
        p = seq.prefix
        if p is not None and not p.freed and not p.ready:
            return True
        if seq.computes is None or held < self.max_prefix_slots:
            return False
        # at most half the slots hold prefixes (forks need the rest); wait if one will be freed
        if any(not q.owned for q in self.pinned) or any(
                s.computes is not None and not s.computes.owned for s in self.running):
            return True
        return None

    def _start(self, seq: Sequence) -> bool:
        """Set up a newly slotted sequence's cache: forked from its prefix when that is pinned.
        False: no block for the fork now."""
        p = seq.prefix
        if p is None or p.freed:
            return True
        if not self.cache.fork(p.slot, seq.slot, len(p.tokens)):
            return False
        seq.num_cached = len(p.tokens)
        self.forked_tokens += len(p.tokens)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        batch = self._prefill()
        if batch is not None:
            return batch
        return self._decode()

    def prefill_next(self) -> PrefillBatch | None:
        """The next prefill, if one is due, while the last step's sampled tokens are not read yet
        (those sequences, ``pending == 0``, are neither prefilled nor preempted here)."""
        return self._prefill()

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
        stuck: list[Sequence] = []  # partly prefilled, no blocks for their next chunk
        for seq in self.running:  # continue chunked prefills first: they hold slots
            if seq.pending > 1 and budget > 0:
                used = self._chunk(batch, seq, budget)
                if used == 0:
                    stuck.append(seq)
                budget -= used
        if stuck and not batch.seqs and not any(s.pending <= 1 for s in self.running):
            self._unstick()  # nothing runs and nothing will free blocks by itself
            return None
        if not self._worth_admitting(budget):
            return batch if batch.seqs else None
        held = len(self.pinned) + sum(1 for s in self.running if s.computes is not None)
        blocked: list[Sequence] = []  # waiting for their prefix: looked past, kept in order
        while self.waiting and budget > 0 and len(blocked) < self.lookahead:
            seq = self.waiting[0]
            wait = self._must_wait(seq, held)
            if wait:
                blocked.append(self.waiting.popleft())
                continue
            if wait is None:  # a prefix that cannot be computed now: its users prefill it themselves
                self.drop(self.waiting.popleft())
                continue
            slot = self.cache.allocate_slot()
            if slot is None:
                break
            seq.slot = slot
            used = self._chunk(batch, seq, budget) if self._start(seq) else 0
            if used == 0:  # no blocks for it now
                self.cache.free(slot)
                seq.slot, seq.num_cached = None, 0
                if not self.running and not batch.seqs:  # nothing will free up: it never fits
                    self.waiting.popleft()
                    self._reject(seq)
                    continue
                break
            self.waiting.popleft()
            self.running[seq] = None
            held += seq.computes is not None
            if seq.holds_prefix:  # forked (or prefilling it all): it needs the prefix no more
                self._let_go(seq)
            budget -= used
        self.waiting.extendleft(reversed(blocked))
        return batch if batch.seqs else None

    def _reject(self, seq: Sequence) -> None:
        self.drop(seq)
        self.rejected.append((seq, f"the cache cannot hold this request ({seq.num_tokens} "
                                   "tokens); raise the engine's memory budget"))

    def _unstick(self) -> None:
        """Partial prefills hold the blocks, none can take its next chunk and none decodes: free
        the newest sequence's blocks (it is recomputed later), or, when only one is left, reject
        it: alone it can never fit."""
        victim = next(reversed(self.running))
        if len(self.running) > 1:
            self.preempt(victim)
        else:
            self.finish(victim)
            self._reject(victim)

    def decodes_next(self, batch_size: int) -> bool:
        """Whether the next step would be a decode of the ``batch_size`` sequences of the decode
        whose tokens are not read yet: they are every running sequence (no chunked prefill to
        continue) and no admission is due."""
        return batch_size == len(self.running) and not self._worth_admitting(self.max_batch_tokens, decoding=True)

    def _worth_admitting(self, budget: int, decoding: bool | None = None) -> bool:
        if not self.waiting or budget <= 0:
            return False
        free = len(self.cache.free_slots)
        if decoding is None:
            decoding = any(s.pending <= 1 for s in self.running)  # 0: its last token not read yet
        if not decoding or free >= min(self.admit_slots, len(self.waiting)):
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
        seq.finished = True
