"""The tokenizer side of the model: load it from a checkpoint folder, format chat prompts with
the checkpoint's own chat template, encode and decode.

Uses transformers' ``PreTrainedTokenizerFast`` (Rust tokenizers; importing it does not import
torch). Plain prompts get BOS from the tokenizer; chat prompts come out of the chat template
with no BOS. Never enables ``trust_remote_code``. Knows nothing of models, Ray or files other
than the checkpoint folder's tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast


class TokenizerError(ValueError):
    """The checkpoint folder has no usable tokenizer (or no chat template when one is needed)."""


class Codec:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tok = tokenizer

    @property
    def eos_token_id(self) -> int:
        return int(self.tok.eos_token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def chat_text(self, user: str, system: str | None = None) -> str:
        """The prompt string of a one-turn chat, ending with the assistant's turn opener."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_messages(self, messages: list[dict[str, str]], system: str | None = None) -> str:
        """The prompt string of a whole chat (``{role, content}`` messages; ``system`` first when
        given and the chat has no system message), ending with the assistant's turn opener."""
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, texts: list[str], chat: bool) -> list[list[int]]:
        """Token ids of whole prompts: BOS added for plain prompts, none for chat prompts."""
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=not chat)["input_ids"]

    def encode_fragment(self, text: str) -> list[int]:
        """Token ids of a piece of text, no special tokens."""
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_fragments(self, texts: list[str]) -> list[list[int]]:
        """``encode_fragment`` of many texts in one batch."""
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens (EOS) dropped."""
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_fragment(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode_fragments(self, seqs: list[list[int]]) -> list[str]:
        """``decode_fragment`` of many id lists in one batch (the Rust tokenizer's own batch
        decode, which is what ``decode_fragment`` calls per list, with no clean-up)."""
        return self.tok.backend_tokenizer.decode_batch(seqs, skip_special_tokens=False) if seqs else []


def load_codec(folder: str | Path) -> Codec:
    """The tokenizer of the checkpoint in ``folder`` (``tokenizer.json`` and its config)."""
    p = Path(folder)
    if not (p / "tokenizer.json").is_file():
        raise TokenizerError(f"{p}: no tokenizer.json in the checkpoint folder")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(p))
    except Exception as e:  # the library raises many types here; report them as one
        raise TokenizerError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if tok.eos_token_id is None:
        raise TokenizerError(f"{p}: the tokenizer has no EOS token")
    return Codec(tok)
