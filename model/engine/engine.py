"""The engine: the one entry point, tokens in and tokens out.

    engine = Engine(model, EngineConfig(memory_fraction=0.9))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=128))
    for out in engine.stream(requests):   # offline mode: bounded memory, completion order
        ...

``add_request`` / ``step`` give callers continuous batching; ``stream`` keeps the device full
from an iterator of any length while holding at most ``max_waiting`` requests in memory.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..hymba import HymbaForCausalLM
from ..sampling import sample
from .api import RequestOutput, SamplingParams
from .cache import KVCache, plan_cache
from .runner import ModelRunner
from .scheduler import DecodeBatch, Scheduler, Sequence


class QueueFull(RuntimeError):
    """``add_request`` when ``max_waiting`` requests are already queued (backpressure)."""


@dataclass(frozen=True)
class EngineConfig:
    memory_budget_bytes: int | None = None  # cache budget; None: from memory_fraction
    memory_fraction: float = 0.9            # of the GPU's memory this engine may use in all
    max_num_seqs: int = 4096                # sequences resident at once (cache slots)
    max_batch_tokens: int = 8192            # prompt tokens per prefill step
    max_chunk_tokens: int | None = 1024     # one sequence's tokens per prefill step (None: no cap;
                                            # measured: see scheduler.py)
    block_size: int = 64                    # tokens per paged block (global layers)
    ssm_state_dtype: torch.dtype = torch.float32
    expected_context: int = 2048            # tokens a sequence is sized for when planning blocks
    max_waiting: int = 100_000              # queued requests before add_request raises QueueFull
    cpu_budget_bytes: int = 1 << 30         # default cache budget on the CPU
    cuda_graphs: bool = True                # decode under CUDA graphs (CUDA only)


class Engine:
    def __init__(self, model: HymbaForCausalLM, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        cfg = model.config
        self.eos = cfg.eos_token_id
        self.max_context = cfg.max_position_embeddings - cfg.num_memory_tokens
        budget = self._budget()
        shape = plan_cache(cfg, budget, config.max_num_seqs, config.block_size, model.dtype,
                           config.ssm_state_dtype, config.expected_context)
        self.cache = KVCache(model, shape)
        self.runner = ModelRunner(model, self.cache, config.cuda_graphs)
        self.scheduler = Scheduler(self.cache, config.max_batch_tokens, config.max_chunk_tokens)
        self._ids = itertools.count()
        self._done: list[RequestOutput] = []  # finished outside a step (rejected requests)
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
    def add_request(self, prompt: list[int], params: SamplingParams = SamplingParams()) -> int:
        """Queue a request; returns its id. Raises QueueFull past ``max_waiting``."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests already waiting")
        rid = next(self._ids)
        seq = Sequence(rid, list(prompt), params, params.seed if params.seed is not None else rid)
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

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._done)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; return the requests that finished in it."""
        finished, self._done = self._done, []
        batch = self.scheduler.schedule()
        for seq, error in self.scheduler.rejected:
            finished.append(RequestOutput(seq.request_id, seq.output, "error", len(seq.prompt), error))
        self.scheduler.rejected.clear()
        if batch is None:
            return finished
        self.stats["steps"] += 1
        t0 = time.perf_counter()
        kind = "decode_s" if isinstance(batch, DecodeBatch) else "prefill_s"
        if isinstance(batch, DecodeBatch):
            seqs = batch.seqs
            dev = self.model.device
            slot_idx = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev)
            pos = torch.tensor([s.num_cached for s in seqs], dtype=torch.long, device=dev)
            ids = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev)
            logits = self.runner.decode(slot_idx, pos, ids)
            for s in seqs:
                s.num_cached += 1
            self.stats["decode_tokens"] += len(seqs)
            to_sample = seqs
        else:
            logits = self.runner.prefill([s.slot for s in batch.seqs], batch.starts, batch.chunks)
            for s, c in zip(batch.seqs, batch.chunks):
                s.num_cached += len(c)
            self.stats["prefill_tokens"] += sum(len(c) for c in batch.chunks)
            keep = [i for i, done in enumerate(batch.complete) if done]
            to_sample = [batch.seqs[i] for i in keep]
            logits = logits[keep] if len(keep) != len(batch.seqs) else logits
        if to_sample:
            finished += self._sample_and_update(to_sample, logits)  # syncs: the step is done
        self.stats[kind] += time.perf_counter() - t0
        return finished

    def _sample_and_update(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        dev = logits.device
        p = [s.params for s in seqs]
        new = sample(
            logits,
            torch.tensor([x.temperature for x in p], device=dev),
            torch.tensor([x.top_p for x in p], device=dev),
            torch.tensor([x.top_k for x in p], dtype=torch.long, device=dev),
            torch.tensor([s.seed for s in seqs], dtype=torch.long, device=dev),
            torch.tensor([len(s.output) for s in seqs], dtype=torch.long, device=dev),
            all_greedy=all(x.temperature == 0 for x in p),
        ).tolist()
        out = []
        for s, t in zip(seqs, new):
            s.output.append(t)
            reason = None
            if not s.params.ignore_eos and (t == self.eos or t in s.params.stop_token_ids):
                reason = "stop"
            elif len(s.output) >= s.params.max_new_tokens or s.num_tokens >= self.max_context:
                reason = "length"
            if reason:
                self.scheduler.finish(s)
                out.append(RequestOutput(s.request_id, s.output, reason, len(s.prompt)))
        return out

    # ---- blocking and offline modes -------------------------------------------------------
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        results: list[RequestOutput | None] = [None] * len(prompts)
        for i, out in self.stream(zip(prompts, plist)):
            results[i] = out
        return results  # type: ignore[return-value]

    def stream(self, requests: Iterable[tuple[list[int], SamplingParams]]) -> Iterator[tuple[int, RequestOutput]]:
        """Offline mode: pull (prompt, params) from ``requests`` as room frees up, yield
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
                i, (prompt, params) = nxt
                index_of[self.add_request(prompt, params)] = i
            if exhausted and not self.has_unfinished():
                return
            for out in self.step():
                yield index_of.pop(out.request_id), out
