"""The engine's per-request logits hook (model/engine/logits.py) on the CPU: log-probabilities,
forced tokens (a constraint's mask), min_new_tokens, repetition / presence / frequency
penalties, each checked against a direct computation from the model's full-forward logits, and
each applied per request (alone == inside a mixed batch)."""

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from hymba_batch.model.engine import Engine, SamplingParams
from hymba_batch.pipeline.classify import ForcedTokens
from hymba_batch.model.sampling import unpack_bitmask

PROMPT = [1, 9, 10, 11, 9, 10]


def _greedy_reference(model, prompt, n, transform):
    """Greedy decoding by full forwards, ``transform(logits_row, prompt, output)`` applied each step."""
    out: list[int] = []
    for _ in range(n):
        row = model.logits(torch.tensor(prompt + out))[-1]
        out.append(int(transform(row, prompt, out).argmax()))
    return out


def test_logprobs_are_the_models_own(tiny_model):
    out = Engine(tiny_model).generate([PROMPT], SamplingParams(max_new_tokens=6, logprobs=True, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    logits = tiny_model.logits(torch.tensor(PROMPT + out.token_ids))
    ref = torch.log_softmax(logits[len(PROMPT) - 1:-1], -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert np.allclose(out.logprobs, ref.tolist(), atol=1e-4)
    plain = Engine(tiny_model).generate([PROMPT], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert plain.logprobs is None and plain.token_ids == out.token_ids


def test_forced_tokens_score_a_continuation(tiny_model):
    label = [500, 17, 4242]
    engine = Engine(tiny_model)
    outs = engine.generate([PROMPT, PROMPT[:3]], [
        SamplingParams(max_new_tokens=3, logprobs=True, constraint=ForcedTokens(label)),
        SamplingParams(max_new_tokens=4, ignore_eos=True)])
    assert outs[0].token_ids == label and outs[0].finish_reason == "stop"
    logits = tiny_model.logits(torch.tensor(PROMPT + label))
    ref = torch.log_softmax(logits[len(PROMPT) - 1:-1], -1).gather(-1, torch.tensor(label)[:, None])[:, 0]
    assert np.allclose(outs[0].logprobs, ref.tolist(), atol=1e-4)
    alone = Engine(tiny_model).generate([PROMPT[:3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert outs[1].token_ids == alone.token_ids  # the constrained neighbour changed nothing


def test_a_failing_constraint_is_its_requests_error(tiny_model):
    class Broken(ForcedTokens):
        def advance(self, token_id: int) -> None:
            raise RuntimeError("matcher lost")

    outs = Engine(tiny_model).generate([PROMPT, PROMPT], [
        SamplingParams(max_new_tokens=3, constraint=Broken([7])), SamplingParams(max_new_tokens=3, ignore_eos=True)])
    assert outs[0].finish_reason == "error" and "matcher lost" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 3


def test_min_new_tokens_masks_eos_and_stop_tokens(tiny_model):
    first = Engine(tiny_model).generate([PROMPT], SamplingParams(max_new_tokens=1))[0].token_ids[0]
    stopped = Engine(tiny_model).generate([PROMPT], SamplingParams(max_new_tokens=8, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = Engine(tiny_model).generate([PROMPT], SamplingParams(max_new_tokens=8, stop_token_ids=(first,),
                                                                min_new_tokens=4))[0]
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]
    eos = tiny_model.config.eos_token_id

    def no_stops(row, prompt, out):
        row = row.clone()
        if len(out) < 4:
            row[[eos, first]] = float("-inf")
        return row

    ref = _greedy_reference(tiny_model, PROMPT, len(held.token_ids), no_stops)
    assert held.token_ids == ref


def test_repetition_penalty_matches_hugging_face(tiny_model):
    hf = RepetitionPenaltyLogitsProcessor(1.8)

    def penal(row, prompt, out):
        return hf(torch.tensor([prompt + out]), row[None].clone())[0]

    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.8, ignore_eos=True)
    outs = Engine(tiny_model).generate([PROMPT, PROMPT[:4]], [params, SamplingParams(max_new_tokens=8, ignore_eos=True)])
    assert outs[0].token_ids == _greedy_reference(tiny_model, PROMPT, 8, penal)
    plain = _greedy_reference(tiny_model, PROMPT, 8, lambda r, p, o: r)
    assert outs[0].token_ids != plain  # the penalty changed something
    assert outs[1].token_ids == _greedy_reference(tiny_model, PROMPT[:4], 8, lambda r, p, o: r)


def test_presence_and_frequency_penalties_follow_openai(tiny_model):
    def penal(row, prompt, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.shape[0]).float() if out else 0 * row
        return row - 1.5 * counts - 2.0 * (counts > 0).float()

    params = SamplingParams(max_new_tokens=10, presence_penalty=2.0, frequency_penalty=1.5, ignore_eos=True)
    engine = Engine(tiny_model)
    outs = engine.generate([PROMPT, PROMPT], [params, SamplingParams(max_new_tokens=10, ignore_eos=True)])
    assert outs[0].token_ids == _greedy_reference(tiny_model, PROMPT, 10, penal)
    assert len(set(outs[0].token_ids)) > len(set(outs[1].token_ids))  # penalties spread the tokens
    assert not engine.logits_processor.penalties.row_of  # finished requests give their rows back


@pytest.mark.parametrize("vocab", [31, 32, 77])
def test_bitmask_unpacks_bit_t_as_token_t(vocab):
    rng = np.random.default_rng(vocab)
    allowed = rng.random((3, vocab)) < 0.3
    words = np.zeros((3, (vocab + 31) // 32), dtype=np.uint32)
    for b, t in zip(*np.nonzero(allowed)):
        words[b, t // 32] |= np.uint32(1 << (t % 32))
    got = unpack_bitmask(torch.from_numpy(words.view(np.int32)), vocab)
    assert got.tolist() == allowed.tolist()


def test_min_new_tokens_is_validated():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)


def test_batched_constraint_hooks_serve_a_whole_step(tiny_model):
    """A class's ``fill_masks`` / ``advance_all`` classmethods are used for all its requests of a
    step, and an error it reports for one request fails only that request."""
    calls = {"fill": 0, "advance": 0}

    class Batched(ForcedTokens):
        @classmethod
        def fill_masks(cls, constraints, out, rows):
            calls["fill"] += 1
            for c, r in zip(constraints, rows):
                c.allowed_mask(out[r])

        @classmethod
        def advance_all(cls, constraints, tokens):
            calls["advance"] += 1
            errors = []
            for c, t in zip(constraints, tokens):
                c.advance(t)
                errors.append("refused" if c.tokens == (9, 10) else None)
            return errors

    labels = [[5, 6], [7, 8], [9, 10]]
    outs = Engine(tiny_model).generate([PROMPT] * 3, [SamplingParams(max_new_tokens=2, constraint=Batched(x))
                                                      for x in labels])
    assert [o.token_ids for o in outs[:2]] == labels[:2] and all(o.finish_reason == "stop" for o in outs[:2])
    assert outs[2].finish_reason == "error" and "refused" in outs[2].error
    assert calls["fill"] == calls["advance"] >= 1


def test_sampling_never_picks_a_masked_token_at_the_top_mantissa():
    """Seed 3145, step 0, column 3191 draws the largest 24-bit mantissa, which rounded to u = 1.0
    in float32: Gumbel noise +inf, and +inf + (-inf) = NaN won argmax. Every other column of that
    row is allowed once: the sampled token must be it, never the masked 3191."""
    from hymba_batch.model.sampling import sample, uniform_noise

    V, seed, hot = 4096, 3145, 3191
    seeds, steps = torch.tensor([seed]), torch.tensor([0])
    assert float(uniform_noise(seeds, steps, V)[0, hot]) < 1.0
    one = torch.ones(1)
    for allowed in (0, 17, 4095):
        logits = torch.full((1, V), float("-inf"))
        logits[0, allowed] = 0.5
        got = sample(logits, one, one, torch.zeros(1, dtype=torch.long), seeds, steps)
        assert int(got) == allowed
