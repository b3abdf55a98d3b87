"""The real Hymba tokenizer and chat template (../shared/hymba-1.5b), through our Codec."""

from pathlib import Path

import pytest

from hymba_batch.pipeline.tokenizer import load_codec

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "hymba-1.5b"


@pytest.fixture(scope="module")
def real():
    assert (REAL / "tokenizer.json").exists(), f"{REAL} missing: the repo must sit beside ../shared"
    return load_codec(REAL)


def test_round_trip_and_specials(real):
    text = "Hymba runs attention and SSM heads in parallel: naïve café, 漢字, emoji 🙂, tabs\tand\nnewlines."
    ids = real.encode_prompts([text], chat=False)[0]
    assert ids[0] == 1 and 2 not in ids  # BOS added, no EOS
    assert real.decode(ids) == text
    assert real.eos_token_id == 2


def test_chat_template_matches_the_reference_format(real):
    text = real.chat_text("  Hi  ", system="You are a helpful assistant.")
    assert text == ("<extra_id_0>System\nYou are a helpful assistant.\n\n"
                    "<extra_id_1>User\nHi\n<extra_id_1>Assistant\n")
    ids = real.encode_prompts([real.chat_text("Hi")], chat=True)[0]
    assert ids[0] != 1  # chat prompts carry no BOS (apply_chat_template encodes without specials)
    # hymba-architecture.md §7: the prompt's first pieces and the assistant header mid-text
    assert ids[:8] == [529, 17833, 29918, 333, 29918, 29900, 29958, 3924]
    assert ids[-10:] == [29966, 17833, 29918, 333, 29918, 29896, 29958, 7900, 22137, 13]


def test_checkpoint_writer_ships_the_same_tokenizer(tiny_checkpoint, real):
    tiny = load_codec(tiny_checkpoint)
    sample = "The council voted on the park."
    assert tiny.encode_prompts([tiny.chat_text(sample)], chat=True) == real.encode_prompts([real.chat_text(sample)], chat=True)


# ---- parity with transformers' tokenizer, which the Codec no longer imports on its hot path

TEXTS = ["Hello world", " leading space", "trailing space ", "naïve café — 日本語 🙂", "<s> literal </s> tokens",
         "<extra_id_1>User\nhi", "a\n\n\tb", "  ", "x" * 300, "1234567890 3.14159 e=mc^2"]


def test_encode_and_decode_match_transformers(real):
    hf = real.hf
    for chat in (False, True):
        assert real.encode_prompts(TEXTS, chat=chat) == hf(TEXTS, add_special_tokens=not chat)["input_ids"]
    assert real.encode_fragments(TEXTS) == [hf(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert [real.encode_fragment(t) for t in TEXTS] == real.encode_fragments(TEXTS)
    import random
    rng = random.Random(0)
    seqs = [[rng.choice([0, 1, 2, 13, 29871, 32000]) if rng.random() < 0.1 else rng.randrange(32001)
             for _ in range(rng.randrange(1, 60))] for _ in range(50)]
    for ids in seqs:
        assert real.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert real.decode_fragment(ids) == hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert real.decode_fragments(seqs) == [real.decode_fragment(s) for s in seqs]
    assert real.vocab_size == len(hf) and real.eos_token_id == hf.eos_token_id


CHATS = [
    [{"role": "user", "content": "  Hi  "}],
    [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "Summarize: the cat sat."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "tool", "content": "{}"},
     {"role": "user", "content": "c\n\nd"}],
]

# templates that use what Hugging Face chat templates may use beyond Hymba's own
TEMPLATES = {
    "tojson-loopcontrols": "{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}"
                           "{{ bos_token }}{{ m | tojson }}\n{% if loop.index > 3 %}{% break %}{% endif %}"
                           "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    "trim-and-lstrip": "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[U] {{ m['content'] }}\n"
                       "    {% else %}\n[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n    {% endif %}\n"
                       "{% endfor %}\n{{ eos_token }}",
    "generation-block": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                        "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "namespace-and-json": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                          "{{ ns.n }} {{ {'k': 'ü', 'a': [1, 2]} | tojson(indent=2) }}",
}


def _with_template(tmp_path, template: str):
    import json
    import shutil
    folder = tmp_path / "tok"
    shutil.copytree(REAL, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_codec(folder)


def test_chat_templates_render_as_transformers_does(real, tmp_path):
    for messages in CHATS:
        assert real.chat_messages(messages) == real.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    for name, template in TEMPLATES.items():
        codec = _with_template(tmp_path / name, template)
        for messages in CHATS:
            want = codec.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert codec.chat_messages(messages) == want, name


def test_chat_template_errors_are_clear(tmp_path):
    from hymba_batch.pipeline.tokenizer import TokenizerError
    import jinja2
    raising = _with_template(tmp_path / "r", "{{ raise_exception('only user turns, please') }}")
    with pytest.raises(jinja2.TemplateError, match="only user turns"):
        raising.chat_text("hi")
    broken = _with_template(tmp_path / "b", "{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template does not compile"):
        broken.chat_text("hi")


def test_post_processor_must_agree_with_the_config(tmp_path):
    import json
    import shutil
    from hymba_batch.pipeline.tokenizer import TokenizerError
    folder = tmp_path / "tok"
    shutil.copytree(REAL, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False  # tokenizer.json's post-processor still adds BOS
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="add_bos_token is False but tokenizer.json's post-processor adds it"):
        load_codec(folder)


def test_loading_and_prompting_do_not_import_transformers():
    """transformers' import (~0.5 s here, more on slow disks) sat in every actor's start."""
    import subprocess
    import sys
    code = ("import sys; from hymba_batch.pipeline.tokenizer import load_codec; "
            "from hymba_batch.pipeline.prompts import PromptBuilder, PromptConfig; "
            f"c = load_codec({str(REAL)!r}); "
            "p = PromptBuilder(PromptConfig(kind='summarize', chat=True, max_input_tokens=60), c, 100)"
            ".build_batch([{'text': 'word ' * 50}])[0]; "
            "assert p.truncated and p.token_ids, p; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
