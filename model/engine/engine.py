"""The engine: the one entry point, tokens in and tokens out.

    engine = Engine(model, EngineConfig(memory_fraction=0.9))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=128))
    for out in engine.stream(requests):   # offline mode: bounded memory, completion order
        ...

``add_request`` / ``step`` give callers continuous batching; ``stream`` keeps the device full
from an iterator of any length while holding at most ``max_waiting`` requests in memory.

Shared prefixes: ``pid = engine.add_prefix(ids)`` queues ``ids`` to be computed once (one slot,
pinned); ``add_request(suffix, params, prefix=pid)`` is the request ``ids + suffix`` whose state
starts as a fork of the prefix's, so only ``suffix`` is prefilled; ``release_prefix(pid)`` lets
the prefix go once the requests already added have forked from it. A prefix may itself start
from another (``add_prefix(ids, parent=pid)``): n samples of a prompt under a job-wide prefix.

Host and device overlap (``EngineConfig.overlap``): a step ends once its work is queued; its
sampled tokens are read at the start of the next ``step``, after that step's own work is queued
when it does not depend on them (see ``step``). A request's results therefore come back one
``step`` call later than the step that made them; ``stream`` and ``generate`` hide this.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..hymba import HymbaForCausalLM
from ..sampling import sample
from .api import EngineStats, RequestOutput, SamplingParams
from .cache import KVCache, plan_cache
from .constraints import advance_rows
from .logits import LogitsProcessor
from .runner import ModelRunner
from .scheduler import DecodeBatch, PrefillBatch, Prefix, Scheduler, Sequence
from .transfer import ToHost, to_device


class QueueFull(RuntimeError):
    """``add_request`` when ``max_waiting`` requests are already queued (backpressure)."""


@dataclass(frozen=True)
class EngineConfig:
    memory_budget_bytes: int | None = None  # cache budget; None: from memory_fraction
    memory_fraction: float = 0.9            # of the GPU's memory this engine may use in all
    max_num_seqs: int = 4096                # sequences resident at once (cache slots)
    max_batch_tokens: int = 32768           # prompt tokens per prefill step (H200, 2026-12-05: M
                                            # +4.4%, S +3.7% docs/s against 8,192, same run)
    max_chunk_tokens: int | None = 1024     # one sequence's tokens per prefill step (None: no cap;
                                            # measured: see scheduler.py)
    block_size: int = 64                    # tokens per paged block (global layers)
    ssm_state_dtype: torch.dtype | None = None  # SSM state pools; None: the model's dtype, as NVIDIA's
                                            # cache stores it (the scan computes in fp32 either way)
    expected_context: int = 2048            # tokens a sequence is sized for when planning blocks
    max_waiting: int = 100_000              # queued requests before add_request raises QueueFull
    cpu_budget_bytes: int = 1 << 30         # default cache budget on the CPU
    cuda_graphs: bool = True                # decode under CUDA graphs (CUDA only)
    overlap: bool = True                    # queue the next step before reading the last one's tokens


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The rows ``idx`` of ``t`` (all of them when None)."""
    return t if idx is None else t.index_select(0, idx)


@dataclass(frozen=True)
class _SamplingInputs:
    """One step's per-row sampling parameters, on the device."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor  # the index of the output token each row samples
    all_greedy: bool

    @classmethod
    def of(cls, seqs: list[Sequence], device: torch.device) -> "_SamplingInputs":
        p = [s.params for s in seqs]
        floats = to_device([[x.temperature for x in p], [x.top_p for x in p]], torch.float32, device)
        ints = to_device([[x.top_k for x in p], [s.seed for s in seqs], [len(s.output) for s in seqs]],
                         torch.long, device)
        return cls(floats[0], floats[1], ints[0], ints[1], ints[2], all(x.temperature == 0 for x in p))

    def select(self, idx: torch.Tensor | None, ahead: int = 0) -> "_SamplingInputs":
        """The rows ``idx`` (all when None), ``ahead`` tokens later."""
        return _SamplingInputs(_rows(self.temperature, idx), _rows(self.top_p, idx), _rows(self.top_k, idx),
                               _rows(self.seeds, idx), _rows(self.steps, idx) + ahead, self.all_greedy)


@dataclass(frozen=True)
class _Launched:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    result: ToHost                 # the sampled ids (then, with logprobs, their log-probabilities)
    logprobs: bool
    tokens: torch.Tensor           # the sampled ids [B], on the device
    sampling: _SamplingInputs
    decode: tuple[torch.Tensor, torch.Tensor] | None  # a decode's (slot_idx, pos): the next one's inputs


class Engine:
    def __init__(self, model: HymbaForCausalLM, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        cfg = model.config
        self.eos = cfg.eos_token_id
        self.max_context = cfg.max_position_embeddings - cfg.num_memory_tokens
        budget = self._budget()
        shape = plan_cache(cfg, budget, config.max_num_seqs, config.block_size, model.dtype,
                           config.ssm_state_dtype or model.dtype, config.expected_context)
        self.cache = KVCache(model, shape)
        self.runner = ModelRunner(model, self.cache, config.cuda_graphs)
        self.scheduler = Scheduler(self.cache, config.max_batch_tokens, config.max_chunk_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, self.eos, model.device)
        self._ids = itertools.count()
        self._prefix_ids = itertools.count()
        self._prefixes: dict[int, Prefix] = {}  # added and not yet released by their owner
        self._done: list[RequestOutput] = []  # finished outside a step (rejected requests)
        self._inflight: _Launched | None = None  # queued on the device, tokens not read yet
        self._unsampled: tuple | None = None  # a decode queued ahead whose sampling waits for the host
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "prefill_s": 0.0, "decode_s": 0.0}

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_context - 1

    def _budget(self) -> int:
        c = self.config
        if c.memory_budget_bytes is not None:
            return c.memory_budget_bytes
        dev = self.model.device
        if dev.type != "cuda":
            return c.cpu_budget_bytes
        total = torch.cuda.get_device_properties(dev).total_memory
        reserve = 6 * (1 << 30)  # activations of a full prefill step and decode logits
        return int(c.memory_fraction * total) - torch.cuda.memory_allocated(dev) - reserve

    # ---- requests -------------------------------------------------------------------------
    def add_prefix(self, token_ids: list[int], parent: int | None = None) -> int:
        """Queue a shared prefix to be computed once; returns its id for ``add_request``. With
        ``parent``, ``token_ids`` continue that prefix (the new prefix is ``parent + token_ids``)."""
        base = self._prefix(parent)
        tokens = (base.tokens if base else []) + list(token_ids)
        vocab = self.model.config.vocab_size
        if not token_ids:
            raise ValueError("empty prefix")
        if len(tokens) >= self.max_prompt_tokens:
            raise ValueError(f"prefix has {len(tokens)} tokens; a prompt may have at most {self.max_prompt_tokens}")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prefix has token ids outside [0, {vocab})")
        pid = next(self._prefix_ids)
        p = Prefix(pid, tokens)
        seq = Sequence(-1 - pid, list(tokens), SamplingParams(max_new_tokens=1), 0, prefix=base, computes=p)
        self.scheduler.add(seq)
        self._prefixes[pid] = p
        return pid

    def release_prefix(self, prefix: int) -> None:
        """The owner is done adding requests with ``prefix``: it is freed once they have forked."""
        self.scheduler.release(self._prefix(prefix), owner=True)
        del self._prefixes[prefix]

    def _prefix(self, prefix: int | None) -> Prefix | None:
        if prefix is None:
            return None
        if prefix not in self._prefixes:
            raise ValueError(f"unknown or released prefix {prefix}")
        return self._prefixes[prefix]

    def add_request(self, prompt: list[int], params: SamplingParams = SamplingParams(),
                    prefix: int | None = None) -> int:
        """Queue a request; returns its id. Raises QueueFull past ``max_waiting``. With
        ``prefix`` (from ``add_prefix``) the prompt is that prefix's tokens followed by ``prompt``."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests already waiting")
        p = self._prefix(prefix)
        rid = next(self._ids)
        seed = params.seed if params.seed is not None else rid
        if p is not None and not prompt:
            self._done.append(RequestOutput(rid, [], "error", len(p.tokens), "empty prompt after the prefix"))
            return rid
        seq = Sequence(rid, (p.tokens if p else []) + list(prompt), params, seed, prefix=p)
        error = self._validate(seq)
        if error:
            self._done.append(RequestOutput(rid, [], "error", len(seq.prompt), error))
        else:
            self.scheduler.add(seq)
        return rid

    def _validate(self, seq: Sequence) -> str | None:
        vocab = self.model.config.vocab_size
        if not seq.prompt:
            return "empty prompt"
        if len(seq.prompt) > self.max_prompt_tokens:
            return (f"prompt has {len(seq.prompt)} tokens; this model accepts at most "
                    f"{self.max_prompt_tokens}")
        if min(seq.prompt) < 0 or max(seq.prompt) >= vocab:
            return f"prompt has token ids outside [0, {vocab})"
        return None

    def snapshot(self) -> EngineStats:
        """The engine's counters now (cheap; safe to call from another thread, when the values
        may be one step apart)."""
        sched, cache, st = self.scheduler, self.cache, self.stats
        blocks_total = cache.shape.num_blocks - 1  # minus the scratch block
        return EngineStats(
            running=len(sched.running), waiting=len(sched.waiting), slots=cache.shape.num_slots - 1,
            blocks_used=blocks_total - len(cache.free_blocks), blocks_total=blocks_total,
            steps=int(st["steps"]), prefill_tokens=int(st["prefill_tokens"]), decode_tokens=int(st["decode_tokens"]),
            prefill_s=float(st["prefill_s"]), decode_s=float(st["decode_s"]), preemptions=sched.num_preemptions)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._done) or self._inflight is not None

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; return the requests that finished.

        With ``overlap`` (the default) a step's sampled tokens stay on the device until the next
        call reads them, and the next step is queued before they are read when it does not need
        them: a decode of the same sequences (``_decode_ahead``) or a prefill after a prefill
        (``_prefill_ahead``). The host's work on one step's tokens then runs while the device
        computes the next. The tokens are the same either way (tests/model/engine/test_overlap.py); an
        admission may land one step later, so a row's floats (log-probabilities) can differ in the
        last bits, as between any two batchings."""
        finished, self._done = self._done, []
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        kind = "decode_s"
        if prev is not None:
            kind = "decode_s" if prev.decode is not None else "prefill_s"
            ahead = self._decode_ahead(prev) if prev.decode is not None else self._prefill_ahead(finished)
            finished += self._apply(prev)
            if self._unsampled is not None:  # its logits needed prev's tokens on the host
                self._inflight, self._unsampled = self._sample_live(*self._unsampled), None
            if ahead:
                self.stats[kind] += time.perf_counter() - t0
                return finished
        batch = self.scheduler.schedule()
        self._take_rejected(finished)
        if batch is not None:
            kind, launched = self._launch(batch)
            if launched is not None and not self.config.overlap:
                finished += self._apply(launched)
            else:
                self._inflight = launched
        self.stats[kind] += time.perf_counter() - t0
        return finished

    def _take_rejected(self, finished: list[RequestOutput]) -> None:
        for seq, error in self.scheduler.rejected:
            if seq.computes is not None:  # a prefix that never fits: its users prefill it themselves
                continue
            finished.append(RequestOutput(seq.request_id, seq.output, "error", len(seq.prompt), error))
        self.scheduler.rejected.clear()

    def _prefill_ahead(self, finished: list[RequestOutput]) -> bool:
        """After a prefill: queue the next prefill, if one is due, before the last one's tokens
        are read (its chunks never need them). True when a step was queued."""
        batch = self.scheduler.prefill_next()
        self._take_rejected(finished)
        if batch is None:
            return False
        _, self._inflight = self._launch(batch)
        return True

    def _launch(self, batch: PrefillBatch | DecodeBatch) -> tuple[str, _Launched | None]:
        """Queue a scheduled step: (its stats key, what it samples)."""
        self.cache.apply_forks()  # state of the sequences forked from a prefix in this schedule
        if isinstance(batch, DecodeBatch):
            seqs, dev = batch.seqs, self.model.device
            slot_idx, pos, ids = to_device([[s.slot for s in seqs], [s.num_cached for s in seqs],
                                            [s.last_token for s in seqs]], torch.long, dev)
            logits = self._forward_decode(seqs, slot_idx, pos, ids)
            return "decode_s", self._launch_sampling(seqs, logits, (slot_idx, pos), _SamplingInputs.of(seqs, dev))
        return "prefill_s", self._launch_prefill(batch)

    def _forward_decode(self, seqs: list[Sequence], slot_idx: torch.Tensor, pos: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
        """Queue one decode forward of ``seqs``; their next tokens' logits."""
        logits = self.runner.decode(slot_idx, pos, ids)
        for s in seqs:
            s.num_cached += 1
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(seqs)
        return logits

    def _launch_prefill(self, batch: PrefillBatch) -> _Launched | None:
        self.stats["steps"] += 1
        logits = self.runner.prefill([s.slot for s in batch.seqs], batch.starts, batch.chunks)
        for s, c in zip(batch.seqs, batch.chunks):
            s.num_cached += len(c)
        self.stats["prefill_tokens"] += sum(len(c) for c in batch.chunks)
        keep = []
        for i, (s, done) in enumerate(zip(batch.seqs, batch.complete)):
            if done and s.computes is not None:  # a computed prefix samples nothing: pin it
                self.scheduler.pin(s)
            elif done:
                keep.append(i)
        if not keep:
            return None
        to_sample = [batch.seqs[i] for i in keep]
        if len(keep) != len(batch.seqs):
            logits = logits.index_select(0, to_device(keep, torch.long, logits.device))
        return self._launch_sampling(to_sample, logits, None, _SamplingInputs.of(to_sample, logits.device))

    def _decode_ahead(self, prev: _Launched) -> bool:
        """Queue the decode that follows ``prev`` before prev's tokens are read, when it is
        knowable now: prev was a decode and the scheduler would decode the same sequences next (no
        prefill due). Sequences that end at prev by length are left out; one that stops at prev
        (EOS, a stop string) computes one token, dropped. When a request needs prev's tokens on
        the host to shape its next logits (a grammar mask, penalties, min_new_tokens), only the
        forward is queued now: its sampling follows once they are read (``_sample_live``), so the
        host's mask work still runs beside the forward. True when the decode was queued."""
        assert prev.decode is not None
        live = [i for i, s in enumerate(prev.seqs) if not s.finished]
        if not self.scheduler.decodes_next(len(live)):
            return False
        keep = [i for i in live if len(prev.seqs[i].output) + 1 < prev.seqs[i].params.max_new_tokens
                and prev.seqs[i].num_tokens + 1 < self.max_context]
        seqs = [prev.seqs[i] for i in keep]
        if not seqs:
            return False
        if not all(self.cache.reserve_blocks(s.slot, s.num_cached + 1) for s in seqs):
            return False  # the scheduler preempts: after prev's tokens are read
        idx = None if len(keep) == len(prev.seqs) else to_device(keep, torch.long, prev.tokens.device)
        slot_idx, pos = (_rows(t, idx) for t in prev.decode)
        pos = pos + 1
        logits = self._forward_decode(seqs, slot_idx, pos, _rows(prev.tokens, idx))
        sampling = prev.sampling.select(idx, ahead=1)
        if all(self.logits_processor.passthrough(s, ahead=1) for s in seqs):
            self._inflight = self._launch_sampling(seqs, logits, (slot_idx, pos), sampling)
        else:
            self._unsampled = (seqs, logits, (slot_idx, pos), sampling)
        return True

    def _sample_live(self, seqs: list[Sequence], logits: torch.Tensor, decode: tuple[torch.Tensor, torch.Tensor],
                     sampling: _SamplingInputs) -> _Launched | None:
        """Sample a decode queued ahead, now that the step before it is read: the sequences that
        finished there are dropped."""
        live = [i for i, s in enumerate(seqs) if not s.finished]
        if not live:
            return None
        if len(live) != len(seqs):
            idx = to_device(live, torch.long, logits.device)
            seqs, logits = [seqs[i] for i in live], _rows(logits, idx)
            decode, sampling = (_rows(decode[0], idx), _rows(decode[1], idx)), sampling.select(idx)
        return self._launch_sampling(seqs, logits, decode, sampling)

    def _launch_sampling(self, seqs: list[Sequence], logits: torch.Tensor,
                         decode: tuple[torch.Tensor, torch.Tensor] | None, sampling: _SamplingInputs) -> _Launched:
        """Queue the logits transforms, sampling and the copy of the tokens to the host."""
        raw, logits = logits, self.logits_processor.process(seqs, logits)
        new = sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seeds, sampling.steps,
                     all_greedy=sampling.all_greedy)
        self.logits_processor.record(new)
        lp = self.logits_processor.logprobs(seqs, raw, new)
        payload = new if lp is None else torch.cat([new.double(), lp.double()])  # one copy for both
        return _Launched(seqs, ToHost(payload), lp is not None, new, sampling, decode)

    def _apply(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for that step only) and advance its requests."""
        vals = launched.result.wait()
        n = len(launched.seqs)
        new, lps = (vals, None) if not launched.logprobs else ([int(t) for t in vals[:n]], vals[n:])
        live = [i for i, s in enumerate(launched.seqs) if not s.finished]  # stopped at the step before
        seqs = [launched.seqs[i] for i in live]
        new = [new[i] for i in live]
        lps = None if lps is None else [lps[i] for i in live]
        con = [i for i, s in enumerate(seqs) if s.params.constraint is not None]
        errors: dict[int, str | None] = {}
        if con:
            t0 = time.perf_counter()
            errs = advance_rows([seqs[i].params.constraint for i in con], [new[i] for i in con])
            errors = dict(zip(con, errs))
            self.logits_processor.stats["constraint_advance_s"] += time.perf_counter() - t0
        out = []
        for i, (s, t) in enumerate(zip(seqs, new)):
            s.output.append(t)
            if lps is not None and s.params.logprobs:
                s.logprobs.append(lps[i])
            c = s.params.constraint
            reason, error = None, errors.get(i)
            if error is not None:
                reason, error = "error", f"decoding constraint: {error}"
            elif not s.params.ignore_eos and (t == self.eos or t in s.params.stop_token_ids):
                reason = "stop"
            elif c is not None and len(s.output) >= s.params.min_new_tokens and c.is_done():
                reason = "stop"
            elif len(s.output) >= s.params.max_new_tokens or s.num_tokens >= self.max_context:
                reason = "length"
            if reason:
                self.scheduler.finish(s)
                self.logits_processor.release(s.request_id)
                out.append(RequestOutput(s.request_id, s.output, reason, len(s.prompt), error,
                                         logprobs=s.logprobs if s.params.logprobs else None))
        return out

    # ---- blocking and offline modes -------------------------------------------------------
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 prefix: int | None = None) -> list[RequestOutput]:
        """Generate for every prompt (each after ``prefix``, if given); results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        results: list[RequestOutput | None] = [None] * len(prompts)
        for i, out in self.stream((p, q, prefix) for p, q in zip(prompts, plist)):
            results[i] = out
        return results  # type: ignore[return-value]

    def stream(self, requests: Iterable[tuple]) -> Iterator[tuple[int, RequestOutput]]:
        """Offline mode: pull (prompt, params) or (prompt, params, prefix id) from ``requests`` as room frees up, yield
        (index in the input, output) as requests finish. Memory stays bounded by the cache
        plus ``2 x slots`` queued requests, whatever the length of the input."""
        it = enumerate(requests)
        index_of: dict[int, int] = {}
        exhausted = False
        low_water = 2 * (self.cache.shape.num_slots - 1)  # minus the scratch slot
        while True:
            while not exhausted and len(self.scheduler.waiting) < low_water:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                i, (prompt, params, *prefix) = nxt
                index_of[self.add_request(prompt, params, *prefix)] = i
            if exhausted and not self.has_unfinished():
                return
            for out in self.step():
                yield index_of.pop(out.request_id), out
