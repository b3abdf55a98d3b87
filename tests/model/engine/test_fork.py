"""Forking a sequence (design.md §3) on the CPU, reference kernels, tiny random checkpoint
(window 16): a shared prefix computed once gives exactly the tokens of the same prompts
prefilled whole; blocks shared by reference count all come back; preemption of forked
requests changes nothing; forked samples equal independently prefilled ones."""

import pytest
from engine_testutil import assert_all_free

from hymba_batch.model.costs import cache_bytes
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("prefix_len", [37, 16, 5])  # past the window, not a block multiple; one block; short
@pytest.mark.parametrize("max_chunk_tokens", [None, 7])  # 7: suffixes and the prefix cut into chunks
def test_shared_prefix_equals_whole_prompts_in_a_mixed_batch(tiny_model, rand_prompts, max_chunk_tokens, prefix_len):
    prefix = rand_prompts(1, prefix_len, prefix_len, seed=20)[0]
    suffixes = [p[1:] for p in rand_prompts(5, 2, 25, seed=21)]
    others = rand_prompts(3, 3, 40, seed=22)  # requests without the prefix in the same batch
    full = [prefix + s for s in suffixes] + others
    ref = [o.token_ids for o in Engine(tiny_model, EngineConfig(block_size=16)).generate(full, _greedy(10))]

    engine = Engine(tiny_model, EngineConfig(block_size=16, max_chunk_tokens=max_chunk_tokens))
    pid = engine.add_prefix(prefix)
    ids = [engine.add_request(s, _greedy(10), prefix=pid) for s in suffixes[:3]]
    ids += [engine.add_request(p, _greedy(10)) for p in others]
    ids += [engine.add_request(s, _greedy(10), prefix=pid) for s in suffixes[3:]]
    engine.release_prefix(pid)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    order = ids[:3] + ids[6:] + ids[3:6]
    assert [outs[i].token_ids for i in order] == ref
    assert [outs[i].prompt_tokens for i in order] == [len(p) for p in full]
    assert engine.scheduler.forked_tokens == 5 * prefix_len  # each forked request skipped the prefix
    assert engine.stats["prefill_tokens"] == prefix_len + sum(map(len, suffixes)) + sum(map(len, others))
    assert_all_free(engine)


def test_forks_share_full_blocks_and_copy_the_partial_one(tiny_model, rand_prompts):
    prefix = rand_prompts(1, 37, 37, seed=23)[0]  # blocks of 16: two full, one partial
    engine = Engine(tiny_model, EngineConfig(block_size=16))
    pid = engine.add_prefix(prefix)
    engine.step()  # computes the prefix
    p = engine._prefixes[pid]
    assert p.ready
    shared = engine.cache.blocks_of[p.slot]
    for s in ([1, 2], [3]):
        engine.add_request(s, _greedy(30), prefix=pid)
    engine.step()  # both fork and prefill their suffix
    forks = [seq.slot for seq in engine.scheduler.running]
    assert len(forks) == 2
    for slot in forks:
        blocks = engine.cache.blocks_of[slot]
        assert blocks[:2] == shared[:2] and blocks[2] != shared[2]
    assert [engine.cache.refs[b] for b in shared] == [3, 3, 1]
    engine.release_prefix(pid)  # its slot goes now; the forks keep the full blocks
    assert p.slot is None and [engine.cache.refs[b] for b in shared[:2]] == [2, 2]
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)


def test_requests_wait_for_a_prefix_being_prefilled_in_chunks(tiny_model, rand_prompts):
    prefix = rand_prompts(1, 45, 45, seed=24)[0]
    suffixes = [p[1:] for p in rand_prompts(4, 2, 9, seed=25)]
    ref = Engine(tiny_model).generate([prefix + s for s in suffixes], _greedy(6))
    engine = Engine(tiny_model, EngineConfig(max_batch_tokens=8, block_size=16))
    pid = engine.add_prefix(prefix)
    got = engine.generate(suffixes, _greedy(6), prefix=pid)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert engine.scheduler.forked_tokens == 4 * 45
    engine.release_prefix(pid)
    assert_all_free(engine)


def test_preempted_forks_give_the_same_tokens(tiny_model, rand_prompts):
    prefix = rand_prompts(1, 21, 21, seed=26)[0]
    suffixes = [p[1:] for p in rand_prompts(8, 5, 30, seed=27)]
    ref = [o.token_ids for o in Engine(tiny_model).generate([prefix + s for s in suffixes], _greedy(40))]
    cb = cache_bytes(tiny_model.config, 4, 4)
    table_row = 4 * (tiny_model.config.max_position_embeddings // 16)
    budget = cb.meta + 6 * (cb.slot + table_row) + 13 * 16 * cb.per_global_token  # 5 slots, 12 blocks + scratch
    engine = Engine(tiny_model, EngineConfig(memory_budget_bytes=budget, block_size=16, max_num_seqs=5,
                                             expected_context=16))
    assert engine.cache.shape.num_slots == 6 and engine.cache.shape.num_blocks == 13
    pid = engine.add_prefix(prefix)
    ids = [engine.add_request(s, _greedy(40), prefix=pid) for s in suffixes]
    engine.release_prefix(pid)  # freed once all have forked: later recomputes prefill it whole
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step())
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.forked_tokens >= 21 * 8
    assert [outs[i] for i in ids] == ref
    assert_all_free(engine)


def test_forked_samples_equal_independently_prefilled_ones(tiny_model, rand_prompts):
    """n samples of one prompt: prefilled once (a prefix of all but its last token, itself
    forked from a job-wide prefix) and forked, vs each sample prefilled alone; same seeds."""
    job = rand_prompts(1, 20, 20, seed=28)[0]
    row = rand_prompts(1, 12, 12, seed=29)[0][1:]
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=500 + j, ignore_eos=True)
              for j in range(4)]
    alone = [Engine(tiny_model).generate([job + row], [p])[0].token_ids for p in params]
    engine = Engine(tiny_model, EngineConfig(block_size=16))
    jp = engine.add_prefix(job)
    rp = engine.add_prefix(row[:-1], parent=jp)
    ids = [engine.add_request(row[-1:], p, prefix=rp) for p in params]
    engine.release_prefix(rp)
    engine.release_prefix(jp)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step())
    assert [outs[i] for i in ids] == alone
    assert len(set(map(tuple, alone))) > 1  # the seeds do matter
    assert engine.stats["prefill_tokens"] == len(job) + len(row) - 1 + 4
    assert_all_free(engine)


def test_prefix_errors(tiny_model):
    engine = Engine(tiny_model)
    with pytest.raises(ValueError, match="empty prefix"):
        engine.add_prefix([])
    with pytest.raises(ValueError, match="unknown or released prefix 7"):
        engine.add_request([1, 2], prefix=7)
    pid = engine.add_prefix([1, 5, 6])
    out = engine.generate([[]], _greedy(2), prefix=pid)[0]
    assert out.finish_reason == "error" and "empty prompt" in out.error
    engine.release_prefix(pid)
    with pytest.raises(ValueError, match="released"):
        engine.add_request([3], prefix=pid)
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)


@pytest.mark.parametrize("max_num_seqs", [3, 9])  # 3: no slot for row prefixes beside the job's
def test_many_forked_prompts_under_few_slots_finish_with_the_same_tokens(tiny_model, rand_prompts, max_num_seqs):
    job = rand_prompts(1, 18, 18, seed=30)[0]
    rows = [p[1:] for p in rand_prompts(6, 3, 10, seed=31)]
    params = [[SamplingParams(max_new_tokens=5, temperature=1.0, seed=10 * i + j, ignore_eos=True)
               for j in range(3)] for i in range(6)]
    ref = Engine(tiny_model).generate([job + r for r in rows for _ in range(3)], [p for ps in params for p in ps])
    engine = Engine(tiny_model, EngineConfig(block_size=16, max_num_seqs=max_num_seqs))
    jp = engine.add_prefix(job)
    ids = []
    for r, ps in zip(rows, params):
        rp = engine.add_prefix(r[:-1], parent=jp)
        ids += [engine.add_request(r[-1:], p, prefix=rp) for p in ps]
        engine.release_prefix(rp)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step())
    assert [outs[i] for i in ids] == [o.token_ids for o in ref]
    assert len(engine.scheduler.pinned) == 1  # the job's prefix, still owned
    engine.release_prefix(jp)
    assert_all_free(engine)


def test_a_prefix_freed_by_its_last_fork_is_not_reused_before_the_fork_copies_it(tiny_model, rand_prompts):
    """Forks copy their state once per step (batched); the prefix's slot, freed when its last
    user forks, must not go to a request admitted later in the same step before that copy."""
    prefix = rand_prompts(1, 30, 30, seed=32)[0]
    suffixes = [p[1:] for p in rand_prompts(2, 4, 9, seed=33)]
    plain = rand_prompts(1, 12, 12, seed=34)[0]
    ref = Engine(tiny_model).generate([prefix + s for s in suffixes] + [plain], _greedy(8))
    engine = Engine(tiny_model, EngineConfig(block_size=16))
    pid = engine.add_prefix(prefix)
    engine.step()
    ids = [engine.add_request(s, _greedy(8), prefix=pid) for s in suffixes] + [engine.add_request(plain, _greedy(8))]
    engine.release_prefix(pid)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step())
    assert [outs[i] for i in ids] == [o.token_ids for o in ref]
    assert_all_free(engine)
