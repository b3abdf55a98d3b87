"""Engine correctness on the GPU (run on the GPU machine: pytest -m gpu). Fast kernels (Triton)
against the fp32 reference; consistency across batches, chunks and the window boundary; a
10,000-request run."""

import pytest
import torch
from engine_testutil import NextResidue

from hymba_batch.model import load_model
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
from hymba_batch.model.kernels import backend


pytestmark = pytest.mark.gpu
SMALL = EngineConfig(memory_budget_bytes=1 << 28)  # many engines per test process


@pytest.fixture(scope="module", autouse=True)
def cuda():
    assert torch.cuda.is_available(), "GPU tests need CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert backend.use_fast(torch.zeros(1, device="cuda")), "Triton fast path must be active on CUDA"


@pytest.fixture(scope="module")
def gold32(shared_dir):
    return load_model(shared_dir / "golden" / "tiny-a", device="cuda", dtype=torch.float32)


@pytest.fixture(scope="module")
def gold16(shared_dir):
    return load_model(shared_dir / "golden" / "tiny-a", device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("i", range(6))
def test_fp32_fast_kernels_match_golden(gold32, golden, teacher_forced, i):
    prompt, gen = golden[f"prompt{i}.input_ids"].tolist(), golden[f"prompt{i}.gen_ids"].tolist()
    got = teacher_forced(gold32, prompt, gen)[:, golden["vocab_columns"]]
    assert (got - golden[f"prompt{i}.uncached_gen_logits"]).abs().max() <= 1e-4


@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize("state", [None, torch.float32], ids=["bf16-state", "fp32-state"])
def test_bf16_engine_vs_fp32_reference(gold16, golden, teacher_forced, i, state):
    prompt, gen = golden[f"prompt{i}.input_ids"].tolist(), golden[f"prompt{i}.gen_ids"].tolist()
    got = teacher_forced(gold16, prompt, gen, ssm_state_dtype=state)[:, golden["vocab_columns"]]
    ref = golden[f"prompt{i}.uncached_gen_logits"]
    rel = (got - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def _logits_of(model, prompts, max_batch_tokens=8192):
    """Last-prompt-token logits of every prompt, prefilled together."""
    engine = Engine(model, EngineConfig(max_batch_tokens=max_batch_tokens, memory_budget_bytes=1 << 28))
    slots = [engine.cache.allocate_slot() for _ in prompts]
    for s, p in zip(slots, prompts):
        engine.cache.reserve_blocks(s, len(p))
    return engine.runner.prefill(slots, [0] * len(prompts), prompts).cpu()


def test_alone_equals_mixed_batch_fp32(gold32, rand_prompts):
    prompts = rand_prompts(16, 1, 300, seed=11)
    mixed = _logits_of(gold32, prompts)
    for j in (0, 5, 15):
        alone = _logits_of(gold32, [prompts[j]])
        assert (alone[0] - mixed[j]).abs().max() <= 1e-4
    out_mixed = Engine(gold32, SMALL).generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    out_alone = Engine(gold32, SMALL).generate([prompts[5]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert out_alone[0].token_ids == out_mixed[5].token_ids


def test_chunked_equals_whole_and_decode_equals_full_forward(gold32, rand_prompts):
    prompt = rand_prompts(1, 200, 200, seed=12)[0]
    whole = Engine(gold32, SMALL)
    s = whole.cache.allocate_slot()
    whole.cache.reserve_blocks(s, 260)
    ref = whole.runner.prefill([s], [0], [prompt])
    chunked = Engine(gold32, SMALL)
    c = chunked.cache.allocate_slot()
    chunked.cache.reserve_blocks(c, 260)
    for start in range(0, 195, 13):
        chunked.runner.prefill([c], [start], [prompt[start:start + 13]])
    last = chunked.runner.prefill([c], [195], [prompt[195:]])
    assert (last - ref).abs().max() <= 1e-4
    # decode across the window boundary (window 16) == uncached full forward
    gen = [int(t) for t in torch.randint(3, 32000, (40,))]
    dev = gold32.device
    for j, tok in enumerate(gen):
        row = chunked.runner.decode(torch.tensor([c], device=dev), torch.tensor([200 + j], device=dev),
                                    torch.tensor([tok], device=dev))[0]
        full = gold32.logits(torch.tensor(prompt + gen[:j + 1]))[-1]
        assert (row - full).abs().max() <= 1e-4, j


def test_ten_thousand_requests_each_answered_once(gold16):
    g = torch.Generator().manual_seed(13)
    n = 10_000
    lens = torch.randint(1, 400, (n,), generator=g).tolist()
    news = torch.randint(1, 48, (n,), generator=g).tolist()
    engine = Engine(gold16, EngineConfig(max_num_seqs=1024, memory_budget_bytes=2 << 30))
    reqs = ((torch.randint(3, 32000, (L,), generator=g).tolist(), SamplingParams(max_new_tokens=m, ignore_eos=True))
            for L, m in zip(lens, news))
    seen = {}
    for i, out in engine.stream(reqs):
        assert i not in seen
        seen[i] = out
    assert sorted(seen) == list(range(n))
    assert all(seen[i].completion_tokens == news[i] and seen[i].prompt_tokens == lens[i] for i in range(n))


def test_forked_prefix_equals_whole_prompts_fp32(gold32, rand_prompts):
    """A shared prefix (past the window, not a block multiple) computed once and forked, under
    the compiled kernels and CUDA-graph decode: the same greedy tokens as the whole prompts."""
    prefix = rand_prompts(1, 300, 300, seed=13)[0]
    suffixes = [p[1:] for p in rand_prompts(12, 2, 80, seed=14)]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = Engine(gold32, SMALL).generate([prefix + s for s in suffixes], params)
    engine = Engine(gold32, SMALL)
    pid = engine.add_prefix(prefix)
    got = engine.generate(suffixes, params, prefix=pid)
    engine.release_prefix(pid)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert engine.scheduler.forked_tokens == 12 * 300
    assert len(engine.cache.free_blocks) == engine.cache.shape.num_blocks - 1


def test_overlap_equals_reading_every_step_on_cuda(gold32, rand_prompts):
    """The overlapped engine (pinned copies, events, decodes queued ahead under CUDA graphs)
    gives the tokens of the engine that reads every step's tokens first."""
    prompts = rand_prompts(40, 2, 120, seed=41)
    vocab = gold32.config.vocab_size

    def params():  # constraints hold state: fresh ones per run
        return [SamplingParams(max_new_tokens=4 + i % 23, temperature=0.0 if i % 2 else 0.8, seed=i,
                               stop_token_ids=(7, 11, 13) if i % 3 == 0 else (), logprobs=i % 5 == 0,
                               constraint=NextResidue(vocab, 3 + i % 7) if i % 4 == 1 else None)
                for i in range(len(prompts))]

    outs = {}
    for overlap in (False, True):
        cfg = EngineConfig(memory_budget_bytes=1 << 28, max_num_seqs=16, max_batch_tokens=256,
                           max_chunk_tokens=64, overlap=overlap)
        got = Engine(gold32, cfg).generate(prompts, params())
        outs[overlap] = [(o.token_ids, o.finish_reason) for o in got]
        lps = [o.logprobs for o in got if o.logprobs]
    assert outs[True] == outs[False]
    assert lps


def test_graphs_captured_up_front_give_the_lazily_captured_tokens(gold32, rand_prompts):
    """``DecodeGraphs.capture_all`` (the benchmark's warm-up) captures every batch bucket; decoding
    on them afterwards gives the tokens of an engine that captures each bucket at first use."""
    from hymba_batch.model.engine.runner import decode_bucket

    prompts = rand_prompts(40, 2, 60, seed=43)
    params = [SamplingParams(max_new_tokens=2 + i % 19, ignore_eos=True) for i in range(len(prompts))]
    cfg = EngineConfig(memory_budget_bytes=1 << 26, max_num_seqs=48, cuda_graphs=True)
    lazy, eager = Engine(gold32, cfg), Engine(gold32, cfg)
    graphs = eager.runner.graphs
    graphs.capture_all()
    assert set(graphs.graphs) == {decode_bucket(b, graphs.max_batch) for b in range(1, graphs.max_batch + 1)}
    want = [o.token_ids for o in lazy.generate(prompts, params)]
    assert [o.token_ids for o in eager.generate(prompts, params)] == want
