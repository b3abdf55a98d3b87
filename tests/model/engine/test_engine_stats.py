"""``Engine.snapshot()``: the plain counters the workers publish as metrics (the engine itself
knows nothing of Ray): occupancy, cache blocks, waiting requests, prefill vs decode time."""

from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
from hymba_batch.model.engine.api import EngineStats


def test_snapshot_follows_the_engine_through_a_run(tiny_model, rand_prompts):
    engine = Engine(tiny_model, EngineConfig(max_num_seqs=4, block_size=16))
    idle = engine.snapshot()
    assert isinstance(idle, EngineStats)
    assert (idle.running, idle.waiting, idle.blocks_used, idle.steps) == (0, 0, 0, 0)
    assert idle.slots == engine.cache.shape.num_slots - 1 == 4
    assert idle.blocks_total == engine.cache.shape.num_blocks - 1 and idle.occupancy == 0.0

    prompts = rand_prompts(6, 20, 40, seed=5)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert engine.snapshot().waiting == 6
    engine.step()  # the first step prefills as many prompts as there are slots
    mid = engine.snapshot()
    assert (mid.running, mid.waiting, mid.occupancy) == (4, 2, 1.0)
    assert mid.blocks_used == sum(len(b) for b in engine.cache.blocks_of.values()) > 0
    assert mid.prefill_tokens == sum(len(p) for p in prompts[:4]) and mid.prefill_s > 0 and mid.decode_s == 0

    while engine.has_unfinished():
        engine.step()
    end = engine.snapshot()
    assert (end.running, end.waiting, end.blocks_used) == (0, 0, 0)
    assert end.prefill_tokens == sum(len(p) for p in prompts)
    # every token after the first of each request comes from a decode step
    assert end.decode_tokens == 6 * (5 - 1) and end.decode_s > 0
    assert end.steps == engine.stats["steps"] and end.preemptions == 0
