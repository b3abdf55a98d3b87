"""The engine's overlap (``EngineConfig.overlap``): a decode queued before the previous step's
tokens are read gives the tokens of the engine that reads every step's tokens first,
with stops mid-decode (stop tokens and a watching constraint), mixed lengths, sampling, logprobs,
penalties, admissions while decoding and preemptions; and every slot and block comes back.
CPU, reference kernels, tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from engine_testutil import NextResidue, assert_all_free

from hymba_batch.model.costs import cache_bytes
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams


def _run(model, prompts, params, **cfg):
    """Outputs (tokens, reason, logprobs) in prompt order, the engine, and how many decodes were
    queued ahead."""
    engine = Engine(model, EngineConfig(**cfg))
    engine.ahead = {"decode": 0, "prefill": 0}
    for kind in engine.ahead:
        inner = getattr(engine, f"_{kind}_ahead")

        def counting(*args, _inner=inner, _kind=kind):
            got = _inner(*args)
            engine.ahead[_kind] += got
            return got

        setattr(engine, f"_{kind}_ahead", counting)
    outs = engine.generate(prompts, params)
    return [(o.token_ids, o.finish_reason, o.logprobs) for o in outs], engine, engine.ahead["decode"]


def _stopping_tokens(model, prompts) -> tuple[int, ...]:
    """Tokens the greedy outputs reach mid-way, so that stop tokens end some requests early."""
    free, _, _ = _run(model, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), overlap=False)
    return tuple(sorted({toks[2 + i % 4] for i, (toks, _, _) in enumerate(free)}))


def test_overlap_gives_the_same_outputs_as_reading_every_step(tiny_model, rand_prompts):
    prompts = rand_prompts(14, 2, 40, seed=31)
    stops = _stopping_tokens(tiny_model, prompts)
    params = [SamplingParams(max_new_tokens=1 + (i * 7) % 19, temperature=0.0 if i % 3 else 0.9, seed=i,
                             stop_token_ids=stops if i % 2 else (), logprobs=i % 4 == 1,
                             repetition_penalty=1.3 if i == 5 else 1.0, min_new_tokens=4 if i == 8 else 0)
              for i in range(len(prompts))]
    # 4 slots: requests are admitted while others decode
    ref, _, none_ahead = _run(tiny_model, prompts, params, overlap=False, max_num_seqs=4)
    got, engine, ahead = _run(tiny_model, prompts, params, max_num_seqs=4)
    assert none_ahead == 0 and ahead > 10
    assert [r for _, r, _ in ref].count("stop") >= 2 and [r for _, r, _ in ref].count("length") >= 2
    assert got == ref
    assert_all_free(engine)


class _StopAfter:
    """A watching constraint (no mask) that ends its request once it has seen ``token``."""

    masks = False

    def __init__(self, token: int):
        self.token, self.seen = token, False

    def allowed_mask(self, out: np.ndarray) -> None:  # never asked: masks is False
        raise AssertionError("a watcher is never asked for a mask")

    def advance(self, token_id: int) -> None:
        self.seen = self.seen or token_id == self.token

    def is_done(self) -> bool:
        return self.seen


def test_a_watching_constraint_stops_the_same_token_with_overlap(tiny_model, rand_prompts):
    prompts = rand_prompts(6, 5, 30, seed=32)
    free, _, _ = _run(tiny_model, prompts, SamplingParams(max_new_tokens=16, ignore_eos=True), overlap=False)

    def params():
        return [SamplingParams(max_new_tokens=16, constraint=_StopAfter(toks[2 + i])) for i, (toks, _, _) in enumerate(free)]

    ref, _, _ = _run(tiny_model, prompts, params(), overlap=False)
    got, engine, ahead = _run(tiny_model, prompts, params())
    assert ahead > 0 and all(r == "stop" for _, r, _ in got)
    assert got == ref
    assert_all_free(engine)


def test_masks_that_need_the_last_token_are_filled_after_it_is_read(tiny_model, rand_prompts):
    prompts = rand_prompts(12, 3, 30, seed=34)
    vocab = tiny_model.config.vocab_size

    def params():
        return [SamplingParams(max_new_tokens=20, temperature=0.0 if i % 2 else 1.0, seed=i,
                               repetition_penalty=1.2 if i % 3 == 0 else 1.0,
                               constraint=NextResidue(vocab, 6 + i % 9)) for i in range(len(prompts))]

    ref, _, _ = _run(tiny_model, prompts, params(), overlap=False)
    got, engine, ahead = _run(tiny_model, prompts, params())
    assert ahead > 5 and all(r == "stop" for _, r, _ in got)
    for toks, _, _ in got:
        assert all(b % 5 == (a + 1) % 5 for a, b in zip(toks, toks[1:]))
    assert got == ref
    assert_all_free(engine)


def test_overlap_under_preemption_gives_the_same_tokens(tiny_model, rand_prompts):
    prompts = rand_prompts(8, 30, 60, seed=3)
    cb = cache_bytes(tiny_model.config, 4, 4)
    table_row = 4 * (tiny_model.config.max_position_embeddings // 16)
    budget = cb.meta + 5 * (cb.slot + table_row) + 11 * 16 * cb.per_global_token  # 4 slots, 10 blocks + scratch
    cfg = dict(memory_budget_bytes=budget, block_size=16, max_num_seqs=4, expected_context=16)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8)  # seeds: from the request ids
    ref, _, _ = _run(tiny_model, prompts, params, overlap=False, **cfg)
    got, engine, ahead = _run(tiny_model, prompts, params, **cfg)
    assert ahead > 0 and engine.scheduler.num_preemptions > 0
    assert got == ref
    assert_all_free(engine)


def test_chunked_prefills_queued_ahead_give_the_same_tokens(tiny_model, rand_prompts):
    prompts = rand_prompts(10, 5, 60, seed=33)
    cfg = dict(max_batch_tokens=40, max_chunk_tokens=13)  # many prefill steps, long prompts in chunks
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.7)
    ref, _, _ = _run(tiny_model, prompts, params, overlap=False, **cfg)
    got, engine, _ = _run(tiny_model, prompts, params, **cfg)
    assert engine.ahead["prefill"] > 5
    assert got == ref
    assert_all_free(engine)


def test_random_mixes_give_the_same_outputs_with_and_without_overlap(tiny_model, rand_prompts):
    """Seeded random mixes of everything a request may ask, on small pools (admissions while
    decoding, chunked prefills, preemptions) and shared prefixes: overlapped == step by step."""
    import random

    vocab = tiny_model.config.vocab_size
    preempted = 0
    for trial in range(3):
        rng = random.Random(trial)
        prompts = rand_prompts(16, 2, 50, seed=100 + trial)
        prefix = rand_prompts(1, 20, 20, seed=200 + trial)[0]

        def params():
            r = random.Random(trial)  # the same draws for both engines (constraints hold state)
            out = []
            for i in range(len(prompts)):
                kind = r.choice(["plain", "sampled", "stop", "mask", "penalty", "logprobs", "min"])
                n = r.randint(1, 24)
                out.append(SamplingParams(
                    max_new_tokens=n, temperature=0.8 if kind in ("sampled", "mask") else 0.0,
                    seed=i, stop_token_ids=tuple(r.sample(range(3, 300), 40)) if kind == "stop" else (),
                    constraint=NextResidue(vocab, r.randint(2, 10)) if kind == "mask" else None,
                    frequency_penalty=0.5 if kind == "penalty" else 0.0, logprobs=kind == "logprobs",
                    min_new_tokens=min(3, n) if kind == "min" else 0))
            return out

        cfg = dict(max_num_seqs=rng.choice([3, 5, 8]), max_batch_tokens=rng.choice([32, 64, 256]),
                   max_chunk_tokens=[None, 9, 9][trial], block_size=16)
        if trial != 1:  # 4 slots, 10 blocks: preemptions
            cb = cache_bytes(tiny_model.config, 4, 4)
            table_row = 4 * (tiny_model.config.max_position_embeddings // 16)
            cfg.update(max_num_seqs=4, expected_context=16,
                       memory_budget_bytes=cb.meta + 5 * (cb.slot + table_row) + 11 * 16 * cb.per_global_token)
        got = {}
        for overlap in (False, True):
            engine = Engine(tiny_model, EngineConfig(overlap=overlap, **cfg))
            pid = engine.add_prefix(prefix)
            p = params()
            ids = [engine.add_request(q[1:], p[i], prefix=pid) if i % 3 == 0 else engine.add_request(q, p[i])
                   for i, q in enumerate(prompts)]
            engine.release_prefix(pid)
            outs = {}
            while engine.has_unfinished():
                outs.update((o.request_id, (o.token_ids, o.finish_reason, o.logprobs)) for o in engine.step())
            got[overlap] = [outs[i] for i in ids]
            assert_all_free(engine)
            preempted += engine.scheduler.num_preemptions
        # tokens and reasons equal; log-probabilities to rounding (an admission may come one step
        # later with the overlap, and a row's floats follow its batch's size in the last bits)
        assert [g[:2] for g in got[True]] == [g[:2] for g in got[False]], (trial, cfg)
        for (_, _, a), (_, _, b) in zip(got[True], got[False]):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-4)), (trial, cfg)
    assert preempted > 0
