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
