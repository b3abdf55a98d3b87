"""Prompt building with the real Hymba tokenizer: kinds, chat format, truncation, row errors."""

import pytest

from hymba_batch.pipeline.prompts import MIDDLE_MARK, PromptBuilder, PromptConfig, compile_template, row_seed
from hymba_batch.pipeline.tokenizer import TokenizerError, load_codec

LONG = " ".join(f"word{i}" for i in range(300))


@pytest.fixture(scope="module")
def codec(tokenizer_dir):
    return load_codec(tokenizer_dir)


def test_plain_prompts_get_bos_chat_prompts_do_not(codec) -> None:
    plain = PromptBuilder(PromptConfig(kind="generate", chat=False), codec, 1000).build_batch([{"text": "Hello"}])[0]
    chat = PromptBuilder(PromptConfig(kind="generate", chat=True), codec, 1000).build_batch([{"text": "Hello"}])[0]
    assert plain.token_ids[0] == 1 and plain.error is None
    assert chat.token_ids[0] != 1
    assert "Assistant" in codec.decode_fragment(chat.token_ids)
    assert codec.decode(plain.token_ids) == "Hello"


def test_summarize_uses_instruction_and_text(codec) -> None:
    b = PromptBuilder(PromptConfig(kind="summarize", chat=False, prompt="Summarize briefly."), codec, 1000)
    p = b.build_batch([{"text": "The cat sat."}])[0]
    assert codec.decode(p.token_ids) == "Summarize briefly.\n\nThe cat sat."


@pytest.mark.parametrize("policy", ["head", "middle", "tail"])
def test_truncation_policies_fit_the_limit_and_mark_the_row(codec, policy) -> None:
    b = PromptBuilder(PromptConfig(kind="summarize", chat=True, max_input_tokens=120, truncation=policy), codec, 10_000)
    p = b.build_batch([{"text": LONG}])[0]
    assert p.error is None and p.truncated and len(p.token_ids) <= 120
    text = codec.decode_fragment(p.token_ids)
    assert text.rstrip().endswith("Assistant")  # the chat framing survives every policy
    if policy == "head":
        assert "word299" in text and "word0 " not in text
    elif policy == "tail":
        assert "word0" in text and "word299" not in text
    else:
        assert "word0" in text and "word299" in text and MIDDLE_MARK.strip() in text


def _fit_one_row_at_a_time(b: PromptBuilder, codec, row: dict, body: str, n_tokens: int):
    """The truncation loop as it ran per row before prompts were fitted in batches: cut the excess,
    re-encode, cut again by what is still over (at most 8 rounds)."""
    ids = codec.encode_fragment(body)
    cut = n_tokens - b.limit
    for _ in range(8):
        keep = len(ids) - cut
        if keep <= 0:
            return None
        if b.cfg.truncation == "head":
            text = codec.decode_fragment(ids[len(ids) - keep:])
        elif b.cfg.truncation == "tail":
            text = codec.decode_fragment(ids[:keep])
        else:
            head = (keep + 1) // 2
            text = (codec.decode_fragment(ids[:head]) + MIDDLE_MARK + codec.decode_fragment(ids[len(ids) - (keep - head):])
                    if keep > 1 else codec.decode_fragment(ids[:1]))
        got = b.encode(row, text)
        if len(got) <= b.limit:
            return got
        cut += len(got) - b.limit
    return None


@pytest.mark.parametrize("policy", ["head", "middle", "tail"])
@pytest.mark.parametrize("chat", [False, True])
def test_batched_truncation_matches_one_row_at_a_time(codec, policy, chat) -> None:
    """A unit's long rows are cut in batches; each must get the prompt the per-row loop gives,
    whatever its length, and rows under the limit stay as they are."""
    import random
    rng = random.Random(3)
    vocab = ["alpha", "beta,", "gamma.", "naïve", "über", "1234", "x", "(y)", "—", "日本語", "\n", "don't"]
    rows = [{"text": " ".join(rng.choice(vocab) for _ in range(rng.choice([5, 40, 90, 300, 700])))}
            for _ in range(40)]
    b = PromptBuilder(PromptConfig(kind="summarize", chat=chat, max_input_tokens=100, truncation=policy), codec, 10_000)
    got = b.build_batch(rows)
    assert sum(p.truncated for p in got) >= 15 and sum(not p.truncated for p in got) >= 5
    for row, p in zip(rows, got):
        n = len(b.encode(row, row["text"]))
        if n <= 100:
            assert p.token_ids == b.encode(row, row["text"]) and not p.truncated
        else:
            assert p.truncated and p.token_ids == _fit_one_row_at_a_time(b, codec, row, row["text"], n)


def test_batched_truncation_keeps_row_errors_apart(codec) -> None:
    """A template that fails only once the text is cut fails its own row, not the batch."""
    cfg = PromptConfig(kind="template", text_column="body", chat=False, max_input_tokens=40, truncation="tail",
                       template="{{ body }}{% if 'word299' not in body %}{{ 1 / 0 }}{% endif %}")
    b = PromptBuilder(cfg, codec, 10_000)
    ok, fails = b.build_batch([{"body": "word299 fits"}, {"body": LONG}])  # tail cuts lose word299
    assert ok.error is None and not ok.truncated
    assert fails.token_ids is None and "ZeroDivisionError" in fails.error


def test_engine_limit_applies_and_error_policy(codec) -> None:
    b = PromptBuilder(PromptConfig(kind="generate", chat=False), codec, 50)
    short, long_ = b.build_batch([{"text": "short text"}, {"text": LONG}])
    assert not short.truncated and long_.truncated and len(long_.token_ids) <= 50
    e = PromptBuilder(PromptConfig(kind="generate", chat=False, truncation="error"), codec, 50)
    p = e.build_batch([{"text": LONG}])[0]
    assert p.token_ids is None and "over the limit of 50" in p.error


def test_bad_rows_become_row_errors(codec) -> None:
    b = PromptBuilder(PromptConfig(kind="summarize", chat=False), codec, 1000)
    rows = [{"text": None}, {"text": ""}, {"text": "   \n"}, {"text": 42}, {"text": ValueError("bad utf-8")},
            {"text": "fine"}]
    out = b.build_batch(rows)
    assert [p.error is not None for p in out] == [True, True, True, True, True, False]
    assert "null" in out[0].error and "empty" in out[1].error and "empty" in out[2].error
    assert "int" in out[3].error and "bad utf-8" in out[4].error


def test_template_is_sandboxed_and_strict(codec) -> None:
    cfg = PromptConfig(kind="template", text_column="body", chat=False,
                       template="Title: {{ title }}\n{{ body }}")
    b = PromptBuilder(cfg, codec, 1000)
    ok, missing = b.build_batch([{"title": "T", "body": "B"}, {"body": "B"}])
    assert codec.decode(ok.token_ids) == "Title: T\nB"
    assert missing.token_ids is None and "title" in missing.error
    evil = PromptBuilder(PromptConfig(kind="template", text_column=None, chat=False,
                                      template="{{ body.__class__.__mro__[1].__subclasses__() }}"), codec, 1000)
    p = evil.build_batch([{"body": "x"}])[0]
    assert p.token_ids is None and "unsafe" in p.error.lower()
    with pytest.raises(ValueError, match="task.template: line 1"):
        compile_template("{% for x in %}")


def test_row_seed_depends_only_on_identity() -> None:
    assert row_seed(1, "s3://b/f", 5) == row_seed(1, "s3://b/f", 5)
    assert row_seed(1, "s3://b/f", 5) != row_seed(1, "s3://b/f", 6)
    assert row_seed(1, "a", 5, row_id=9) == row_seed(1, "b", 7, row_id=9)
    assert 0 <= row_seed(2, "x", 0) < 2**31


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_codec(tmp_path)
