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
