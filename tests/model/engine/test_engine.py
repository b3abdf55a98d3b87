"""Engine consistency on the CPU (reference kernels): alone == in a mixed batch, chunked ==
whole prefill, preemption changes nothing, per-request errors, stop tokens, sampling
reproducibility, bounded offline streaming, and byte accounting against costs.py."""

import pytest
import torch

from hymba_batch.model import HymbaConfig, generate
from hymba_batch.model.costs import cache_bytes, param_count
from hymba_batch.model.engine import Engine, EngineConfig, QueueFull, SamplingParams



def _gen(model, prompts, n=12, **cfg):
    engine = Engine(model, EngineConfig(**cfg))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
    return [o.token_ids for o in outs], engine


def test_alone_equals_in_mixed_batch(tiny_model, rand_prompts):
    prompts = rand_prompts(6, 1, 45, seed=1)  # window is 16: some cross it
    mixed, _ = _gen(tiny_model, prompts)
    for p, m in zip(prompts, mixed):
        alone, _ = _gen(tiny_model, [p])
        assert alone[0] == m


def test_chunked_prefill_equals_whole_prefill(golden_model, golden, rand_prompts):
    prompt = golden["prompt5.input_ids"].tolist()  # 72 tokens, window 16
    whole = Engine(golden_model, EngineConfig(max_batch_tokens=4096))
    chunked = Engine(golden_model, EngineConfig(max_batch_tokens=7))
    s1, s2 = whole.cache.allocate_slot(), chunked.cache.allocate_slot()
    whole.cache.reserve_blocks(s1, 80)
    chunked.cache.reserve_blocks(s2, 80)
    ref = whole.runner.prefill([s1], [0], [prompt])
    for start in range(0, 70, 7):
        chunked.runner.prefill([s2], [start], [prompt[start:start + 7]])
    last = chunked.runner.prefill([s2], [70], [prompt[70:]])
    assert (last - ref).abs().max() <= 1e-5
    assert torch.allclose(chunked.cache.ssm[:, s2], whole.cache.ssm[:, s1], atol=1e-5)
    prompts = rand_prompts(5, 20, 60, seed=2)
    whole_ids = _gen(golden_model, prompts)[0]
    assert _gen(golden_model, prompts, max_batch_tokens=9)[0] == whole_ids


def test_chunk_cap_per_sequence(golden_model, rand_prompts):
    """max_chunk_tokens: no chunk in a step is longer, several sequences still share a step, and
    the tokens are those of whole prefills."""
    prompts = rand_prompts(5, 20, 60, seed=2)
    engine = Engine(golden_model, EngineConfig(max_chunk_tokens=7))
    chunks = []
    orig = engine.runner.prefill

    def recording(slots, starts, cs):
        chunks.append([len(c) for c in cs])
        return orig(slots, starts, cs)

    engine.runner.prefill = recording
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == _gen(golden_model, prompts)[0]
    assert max(max(c) for c in chunks) == 7 and max(len(c) for c in chunks) == 5


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(tiny_model, rand_prompts):
    prompts = rand_prompts(8, 30, 60, seed=3)
    ref, _ = _gen(tiny_model, prompts, n=40)
    cb = cache_bytes(tiny_model.config, 4, 4)
    table_row = 4 * (tiny_model.config.max_position_embeddings // 16)
    budget = cb.meta + 5 * (cb.slot + table_row) + 11 * 16 * cb.per_global_token  # 4 slots, 10 blocks + scratch
    got, engine = _gen(tiny_model, prompts, n=40, memory_budget_bytes=budget, block_size=16, max_num_seqs=4,
                       expected_context=16)
    assert engine.cache.shape.num_slots == 5 and engine.cache.shape.num_blocks == 11
    assert engine.scheduler.num_preemptions > 0
    assert got == ref


def test_per_request_errors_do_not_stop_the_others(tiny_model):
    engine = Engine(tiny_model)
    too_long = [1] * (engine.max_prompt_tokens + 1)
    outs = engine.generate([[1, 5, 6], too_long, [], [1, 32001], [1, 7]],
                           SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "length"]
    assert "at most" in outs[1].error and outs[2].error == "empty prompt" and "outside" in outs[3].error
    assert outs[0].completion_tokens == 3 and outs[0].prompt_tokens == 3
    with pytest.raises(ValueError, match="prompt 0: empty prompt"):
        generate(tiny_model, [[]], 2)


def test_stop_tokens_and_eos(tiny_model):
    free = generate(tiny_model, [[1, 9, 10, 11]], 10)[0]
    stop = free[3]
    engine = Engine(tiny_model)
    out = engine.generate([[1, 9, 10, 11]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:free.index(stop) + 1]


def test_sampling_is_reproducible_per_request_whatever_the_batch(tiny_model, rand_prompts):
    prompts = rand_prompts(5, 3, 30, seed=4)
    p = [SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
         for i in range(5)]
    engine = Engine(tiny_model)
    together = [o.token_ids for o in engine.generate(prompts, p)]
    reverse = [o.token_ids for o in Engine(tiny_model).generate(prompts[::-1], p[::-1])][::-1]
    alone = Engine(tiny_model).generate([prompts[2]], [p[2]])[0].token_ids
    assert together == reverse and alone == together[2]
    other_seed = Engine(tiny_model).generate([prompts[2]], [SamplingParams(
        max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)])[0].token_ids
    assert other_seed != together[2]
    greedy = generate(tiny_model, [prompts[0]], 10)[0]
    topk1 = Engine(tiny_model).generate([prompts[0]], SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1,
                                                                    seed=1, ignore_eos=True))[0].token_ids
    assert topk1 == greedy


def test_offline_stream_is_bounded_and_answers_each_request_once(tiny_model, rand_prompts):
    engine = Engine(tiny_model, EngineConfig(max_num_seqs=4))
    pulled = []
    peak = [0]

    def requests():
        for i, prompt in enumerate(rand_prompts(60, 1, 20, seed=5)):
            pulled.append(i)
            peak[0] = max(peak[0], len(pulled) - seen[0])
            yield prompt, SamplingParams(max_new_tokens=1 + i % 4, ignore_eos=True)

    seen = [0]
    indices = []
    for i, out in engine.stream(requests()):
        seen[0] += 1
        indices.append(i)
        assert out.completion_tokens == 1 + i % 4
    assert sorted(indices) == list(range(60))
    assert peak[0] <= 2 * 4 + 4 + 1  # queued + resident, never the whole input


def test_admission_batches_prefills_while_others_decode(tiny_model, rand_prompts):
    """Requests finishing one by one must not each trigger a prefill step of one prompt."""
    engine = Engine(tiny_model, EngineConfig(max_num_seqs=64, max_batch_tokens=4096))
    n = 200
    news = [1 + (7 * i) % 23 for i in range(n)]  # staggered finishes
    reqs = [(p, SamplingParams(max_new_tokens=m, ignore_eos=True))
            for p, m in zip(rand_prompts(n, 2, 12, seed=9), news)]
    prefills = sizes = 0
    orig = engine.runner.prefill

    def counting(slots, starts, chunks):
        nonlocal prefills, sizes
        prefills, sizes = prefills + 1, sizes + len(slots)
        return orig(slots, starts, chunks)

    engine.runner.prefill = counting
    outs = dict(engine.stream(iter(reqs)))
    assert sorted(outs) == list(range(n))
    assert all(outs[i].completion_tokens == news[i] for i in range(n))
    assert sizes == n
    # one prefill fills the 63 usable slots; later ones admit at least an eighth of them (7)
    assert prefills <= 1 + -(-(n - 63) // 7), prefills


def test_queue_full_backpressure(tiny_model):
    engine = Engine(tiny_model, EngineConfig(max_waiting=2))
    engine.add_request([1, 2])
    engine.add_request([1, 3])
    with pytest.raises(QueueFull):
        engine.add_request([1, 4])


def test_cache_bytes_match_costs(tiny_model):
    engine = Engine(tiny_model, EngineConfig(memory_budget_bytes=1 << 24, block_size=16))
    c, shape = engine.cache, engine.cache.shape
    cb = cache_bytes(tiny_model.config, dtype_bytes=4, ssm_bytes=4)
    expected = cb.meta + shape.num_slots * cb.slot + shape.num_blocks * 16 * cb.per_global_token
    assert c.nbytes() == expected + c.block_table.numel() * 4
    assert c.nbytes() <= 1 << 24


def test_ssm_state_follows_the_model_dtype_and_tracks_the_fp32_reference(shared_dir, golden, teacher_forced):
    """A bf16 model keeps its SSM state in bf16 (as NVIDIA's cache does) unless asked for fp32; both
    stay near NVIDIA's fp32 outputs, and the state's dtype is really the one in use."""
    from hymba_batch.model import load_model
    gold16 = load_model(shared_dir / "golden" / "tiny-a", dtype=torch.bfloat16)
    engine = Engine(gold16, EngineConfig(memory_budget_bytes=1 << 24))
    assert engine.cache.ssm.dtype == torch.bfloat16
    cb = cache_bytes(gold16.config, dtype_bytes=2)  # the SSM state at the K/V's width by default
    assert engine.cache.nbytes() == (cb.meta + engine.cache.shape.num_slots * cb.slot + engine.cache.block_table.numel() * 4
                                     + engine.cache.shape.num_blocks * engine.cache.shape.block_size * cb.per_global_token)
    assert Engine(gold16, EngineConfig(memory_budget_bytes=1 << 24, ssm_state_dtype=torch.float32)).cache.ssm.dtype == torch.float32
    i = 5  # 72 prompt tokens, past the window
    prompt, gen = golden[f"prompt{i}.input_ids"].tolist(), golden[f"prompt{i}.gen_ids"].tolist()
    ref = golden[f"prompt{i}.uncached_gen_logits"]
    cols = golden["vocab_columns"]
    got = {dt: teacher_forced(gold16, prompt, gen, ssm_state_dtype=dt)[:, cols] for dt in (None, torch.float32)}
    for dt, g in got.items():
        assert (g - ref).norm() / ref.norm() < 3e-2, dt
    assert not torch.equal(got[None], got[torch.float32])


def test_real_config_costs_match_the_architecture_doc(shared_dir):
    cfg = HymbaConfig.from_json(shared_dir / "hymba-1.5b" / "config.json")
    assert param_count(cfg) == 1_522_797_824
    cb = cache_bytes(cfg, dtype_bytes=2, ssm_bytes=2)
    assert cb.per_global_token == 5760
    # doc §6: SWA (14 layers x 1024 tokens) + states; our ring holds window + 1 entries
    swa_ring = 14 * 1025 * 1920
    assert cb.slot == swa_ring + 3_276_800 + 614_400
    assert cb.meta - 32 * 3200 * 3 * 2 - 32 * 3200 * 16 * 4 == 4_177_920


def test_threaded_front_end_shares_one_batch_across_callers(tiny_model, rand_prompts):
    import threading

    from hymba_batch.model.engine.threaded import ThreadedEngine

    prompts = rand_prompts(8, 2, 30, seed=6)
    params = [SamplingParams(max_new_tokens=6, temperature=0.8, seed=i, ignore_eos=True) for i in range(8)]
    expected = [o.token_ids for o in Engine(tiny_model).generate(prompts, params)]
    front = ThreadedEngine(Engine(tiny_model))
    results: dict[int, list] = {}

    def caller(k):
        outs = front.generate(prompts[4 * k:4 * k + 4], params[4 * k:4 * k + 4])
        results[k] = [o.token_ids for o in outs]

    threads = [threading.Thread(target=caller, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] + results[1] == expected  # concurrent callers, same tokens as one batch


def test_threaded_front_end_fails_waiters_instead_of_hanging(tiny_model):
    from hymba_batch.model.engine.threaded import ThreadedEngine

    engine = Engine(tiny_model)

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step
    front = ThreadedEngine(engine)
    with pytest.raises(RuntimeError, match="device lost"):
        front.generate([[1, 2, 3]], [SamplingParams(max_new_tokens=2)])
    with pytest.raises(RuntimeError, match="failed earlier"):
        front.generate([[1, 2, 3]], [SamplingParams(max_new_tokens=2)])


def _three_block_engine(model, **kw) -> Engine:
    cb = cache_bytes(model.config, 4, 4)
    table_row = 4 * (model.config.max_position_embeddings // 16)
    budget = cb.meta + 3 * (cb.slot + table_row) + 4 * 16 * cb.per_global_token  # 3 blocks of 16 usable
    return Engine(model, EngineConfig(memory_budget_bytes=budget, block_size=16, max_num_seqs=2,
                                      expected_context=16, **kw))


@pytest.mark.parametrize("cap", [None, 8])
def test_request_too_large_for_the_cache_is_a_per_request_error(tiny_model, cap):
    """Also when its first chunks fit (cap 8): it stops holding blocks it can never complete."""
    engine = _three_block_engine(tiny_model, max_chunk_tokens=cap)
    outs = engine.generate([[1] + [5] * 60, [1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert outs[0].finish_reason == "error" and "cannot hold" in outs[0].error
    assert outs[1].finish_reason == "length" and outs[1].completion_tokens == 4


def test_partial_prefills_that_cannot_both_fit_take_turns(tiny_model, rand_prompts):
    """Two prompts that each fit the cache alone but not together, prefilled in chunks of 8: both
    hold blocks and neither can take its next chunk; the newer is preempted, the older finishes,
    then the newer runs: the tokens each would get alone, no hang."""
    prompts = rand_prompts(2, 40, 41, seed=11)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    alone = [_three_block_engine(tiny_model).generate([p], params)[0].token_ids for p in prompts]
    engine = _three_block_engine(tiny_model, max_chunk_tokens=8)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert engine.scheduler.num_preemptions >= 1
