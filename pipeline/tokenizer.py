"""The tokenizer side of the model: load it from a checkpoint folder, format chat prompts with
the checkpoint's own chat template, encode and decode.

Encoding and decoding use the Rust ``tokenizers`` library on the checkpoint's
``tokenizer.json`` directly. Chat templates render in jinja2's immutable sandbox with the
settings Hugging Face documents for chat templates (blocks trimmed and left-stripped, loop
controls, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, the special tokens
as variables, ``{% generation %}`` blocks rendered as plain text); a test holds the output equal
to transformers' ``apply_chat_template``. Importing transformers takes ~0.5 s on a 2-core CPU
and more on slow disks, in every actor's start, so it is imported only when a JSON-schema
grammar needs the transformers tokenizer (``Codec.hf``). Plain prompts get BOS from the
tokenizer; chat prompts come out of the chat template with no BOS. Knows nothing of models, Ray
or files other than the checkpoint folder's tokenizer files.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The checkpoint folder has no usable tokenizer (or no chat template when one is needed)."""


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks the assistant's tokens for training
    masks) renders its body, as transformers does when it is not tracking them."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_CHAT_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols", _Generation])
_CHAT_ENV.filters["tojson"] = _tojson
_CHAT_ENV.globals["raise_exception"] = _raise_exception
_CHAT_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Codec:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, folder: Path, tokenizer: Tokenizer, special: dict[str, str], eos_token_id: int,
                 chat_template: str | None) -> None:
        self.folder, self.tokenizer, self.special = folder, tokenizer, special
        self.eos_token_id = eos_token_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def hf(self) -> Any:
        """The same tokenizer as transformers' ``PreTrainedTokenizerFast`` (llguidance builds
        grammars from it); imports transformers on first use."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.folder))

    def _render(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            raise TokenizerError(f"{self.folder}: the tokenizer has no chat template")
        if self._template is None:
            try:
                self._template = _CHAT_ENV.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"{self.folder}: the chat template does not compile "
                                     f"(line {e.lineno}: {e.message})") from None
        return self._template.render(messages=messages, add_generation_prompt=True, **self.special)

    def chat_text(self, user: str, system: str | None = None) -> str:
        """The prompt string of a one-turn chat, ending with the assistant's turn opener."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._render(messages)

    def chat_messages(self, messages: list[dict[str, str]], system: str | None = None) -> str:
        """The prompt string of a whole chat (``{role, content}`` messages; ``system`` first when
        given and the chat has no system message), ending with the assistant's turn opener."""
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        return self._render(messages)

    def encode_prompts(self, texts: list[str], chat: bool) -> list[list[int]]:
        """Token ids of whole prompts: BOS added for plain prompts, none for chat prompts."""
        if not texts:
            return []
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=not chat)]

    def encode_fragment(self, text: str) -> list[int]:
        """Token ids of a piece of text, no special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_fragments(self, texts: list[str]) -> list[list[int]]:
        """``encode_fragment`` of many texts in one batch."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens (EOS) dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_fragment(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_fragments(self, seqs: list[list[int]]) -> list[str]:
        """``decode_fragment`` of many id lists in one batch."""
        return self.tokenizer.decode_batch(seqs, skip_special_tokens=False) if seqs else []


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` beside the tokenizer, else tokenizer_config.json's
    ``chat_template`` (a string, or named templates of which ``default`` is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    t = config.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def load_codec(folder: str | Path) -> Codec:
    """The tokenizer of the checkpoint in ``folder`` (``tokenizer.json`` and its config)."""
    p = Path(folder)
    if not (p / "tokenizer.json").is_file():
        raise TokenizerError(f"{p}: no tokenizer.json in the checkpoint folder")
    try:
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
    except Exception as e:  # the library raises its own exception types here; report them as one
        raise TokenizerError(f"{p / 'tokenizer.json'}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    tok.no_truncation()  # a saved tokenizer.json may carry truncation or padding settings: prompts
    tok.no_padding()     # are cut by the job's own policy (pipeline/prompts.py), never here
    config = _read_json(p / "tokenizer_config.json")
    special_map = _read_json(p / "special_tokens_map.json")
    special = {k: v for k in _SPECIAL if (v := _token(config.get(k)) or _token(special_map.get(k)))}
    eos = special.get("eos_token")
    eos_id = tok.token_to_id(eos) if eos else None
    if eos_id is None:
        raise TokenizerError(f"{p}: the tokenizer has no EOS token")
    # plain prompts rely on tokenizer.json's post-processor for BOS / EOS: it must agree with the
    # config (transformers would follow the config)
    probe = tok.encode("a", add_special_tokens=True).ids
    bos_id = tok.token_to_id(special["bos_token"]) if "bos_token" in special else None
    for key, got in (("add_bos_token", bos_id is not None and probe[:1] == [bos_id]),
                     ("add_eos_token", probe[-1:] == [eos_id])):
        if isinstance(config.get(key), bool) and config[key] != got:
            raise TokenizerError(f"{p / 'tokenizer_config.json'}: {key} is {config[key]} but tokenizer.json's "
                                 f"post-processor {'adds' if got else 'does not add'} it; re-save the tokenizer "
                                 f"with transformers")
    return Codec(p, tok, special, eos_id, _chat_template(p, config))
