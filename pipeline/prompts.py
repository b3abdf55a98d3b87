"""Prompts: from a row to token ids, with the job's truncation policy.

Task kinds: ``messages`` (the row holds a whole chat as JSON, e.g. an OpenAI Batch request;
a prompt over the limit is a row error, never cut), ``summarize`` (an instruction, then the row's text), ``generate`` (the row's
text is the prompt, after an optional instruction) and ``template`` (a jinja2 template over the
row's columns, rendered in an immutable sandbox with undefined variables as errors). With
``chat`` the message goes through the checkpoint's chat template. A prompt longer than the limit
(the job's ``max_input_tokens`` and the engine's own maximum) loses tokens of its text from the
head, the middle or the tail and is marked ``truncated``, or becomes a row error with policy
``error``. Null, empty or whitespace-only text is a row error. ``classify`` builds its prompt as
``generate`` does. With ``messages_column`` a row's prompt is its list of ``{role, content}``
messages through the chat template (too long is a row error: there is no text to cut). Knows
nothing of models or files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import meta as jinja_meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:  # the tokenizer (transformers) is loaded only where prompts are built
    from .tokenizer import Codec

DEFAULT_SUMMARIZE = "Summarize the following article in a few sentences."
MIDDLE_MARK = " [...] "
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class PromptConfig:
    """How rows become prompts (a plain copy of the job spec's task fields)."""

    kind: str = "summarize"  # summarize | generate | template | messages
    text_column: str | None = "text"
    prompt: str | None = None
    template: str | None = None
    system: str | None = None
    chat: bool = True
    max_input_tokens: int | None = None
    truncation: str = "middle"  # head | middle | tail | error
    messages_column: str | None = None  # a list<struct<role, content>> column: the chat itself
    long_input: str = "truncate"  # truncate (by ``truncation``) | map_reduce (pipeline/longdoc.py)


@dataclass
class Prompt:
    """One row's prompt: token ids, or the row's error."""

    token_ids: list[int] | None
    truncated: bool = False
    error: str | None = None


def compile_template(source: str) -> jinja2.Template:
    """Compile a task template in the sandbox; ValueError with the line on a syntax error."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"task.template: line {e.lineno}: {e.message}") from e


def template_variables(source: str) -> set[str]:
    """The row columns a template reads."""
    return set(jinja_meta.find_undeclared_variables(_ENV.parse(source)))


class PromptBuilder:
    """Builds prompts for a batch of rows under a token limit."""

    def __init__(self, cfg: PromptConfig, codec: Codec, engine_limit: int) -> None:
        if cfg.truncation not in ("head", "middle", "tail", "error"):
            raise ValueError(f"task.truncation: {cfg.truncation!r} is not head, middle, tail or error")
        if cfg.kind == "template" and not cfg.template:
            raise ValueError("task.template: required when task.kind is 'template'")
        if cfg.kind != "template" and not cfg.text_column and not cfg.messages_column:
            raise ValueError(f"input.text_column: required when task.kind is {cfg.kind!r}")
        self.cfg, self.codec = cfg, codec
        self.limit = min(engine_limit, cfg.max_input_tokens or engine_limit)
        self.template = compile_template(cfg.template) if cfg.kind == "template" else None

    # -- message text -------------------------------------------------------------------------
    def _message(self, row: dict[str, Any], body: str | None) -> str:
        c = self.cfg
        if c.kind == "messages":
            return str(body)
        if c.kind == "summarize":
            return f"{c.prompt or DEFAULT_SUMMARIZE}\n\n{body}"
        if c.kind in ("generate", "classify"):
            return f"{c.prompt}\n\n{body}" if c.prompt else str(body)
        assert self.template is not None
        if c.text_column is None:  # the whole rendered message is the truncatable body
            return str(body)
        return self.template.render({**row, c.text_column: body})

    def _full_text(self, message: str) -> str:
        if self.cfg.kind == "messages":
            return self.codec.chat_messages(json.loads(message))
        return self.codec.chat_text(message, self.cfg.system) if self.cfg.chat else message

    def _body(self, row: dict[str, Any]) -> str:
        c = self.cfg
        if c.kind == "template" and c.text_column is None:
            assert self.template is not None
            return self.template.render(row)
        value = row.get(c.text_column)  # type: ignore[arg-type]
        if isinstance(value, Exception):
            raise ValueError(str(value))
        if value is None:
            raise ValueError(f"text is null (column {c.text_column!r})")
        if not isinstance(value, str):
            raise ValueError(f"text is a {type(value).__name__}, not a string (column {c.text_column!r})")
        if not value.strip():
            raise ValueError(f"text is empty (column {c.text_column!r})")
        return value

    # -- public -------------------------------------------------------------------------------
    def build_batch(self, rows: list[dict[str, Any]]) -> list[Prompt]:
        """Prompts for ``rows`` (one per row, in order); never raises for a bad row."""
        out: list[Prompt | None] = [None] * len(rows)
        bodies: list[str | None] = [None] * len(rows)
        texts, where = [], []
        for i, row in enumerate(rows):
            try:
                if self.cfg.messages_column:
                    texts.append(self.codec.chat_messages(_messages(row, self.cfg.messages_column), self.cfg.system))
                    where.append(i)
                    continue
                bodies[i] = self._body(row)
                texts.append(self._full_text(self._message(row, bodies[i])))
                where.append(i)
            except Exception as e:  # noqa: BLE001 - any failure of one row's prompt is that row's error
                out[i] = Prompt(None, error=_row_error(e))
        long: list[tuple[int, int]] = []  # (row, its prompt's tokens): over the limit, fitted below
        for i, ids in zip(where, self.codec.encode_prompts(texts, self.cfg.chat)):
            if len(ids) <= self.limit:
                out[i] = Prompt(list(ids))
            elif self.cfg.messages_column:
                out[i] = Prompt(None, error=f"the messages are {len(ids)} tokens, over the limit of {self.limit}")
            else:
                long.append((i, len(ids)))
        for (i, _), p in zip(long, self.fit_all([(rows[i], bodies[i] or "", n) for i, n in long])):
            out[i] = p
        return [p if p is not None else Prompt(None, error="internal: no prompt built") for p in out]

    def body(self, row: dict[str, Any]) -> str:
        """The row's text (the part a long prompt loses or is cut into); ValueError for a bad row."""
        return self._body(row)

    def encode(self, row: dict[str, Any], body: str) -> list[int]:
        """Token ids of the row's whole prompt with ``body`` as its text."""
        return self.codec.encode_prompts([self._full_text(self._message(row, body))], self.cfg.chat)[0]

    def fit(self, row: dict[str, Any], body: str, n_tokens: int) -> Prompt:
        """A prompt of ``n_tokens`` cut to the limit under the job's truncation policy."""
        return self.fit_all([(row, body, n_tokens)])[0]

    def fit_all(self, items: list[tuple[dict[str, Any], str, int]]) -> list[Prompt]:
        """``fit`` for many (row, body, n_tokens) at once: each round cuts every prompt still over
        the limit by its excess and encodes them in one batch (a few rounds at most: cutting text
        at a token boundary can change how the text around the cut tokenizes)."""
        if not items:
            return []
        if self.cfg.truncation == "error" or self.cfg.kind == "messages":
            return [Prompt(None, error=f"prompt is {n} tokens, over the limit of {self.limit} "
                                       f"(task.truncation is 'error')") for _, _, n in items]
        out: list[Prompt | None] = [None] * len(items)
        body_ids = self.codec.encode_fragments([body for _, body, _ in items])
        cut = [n - self.limit for _, _, n in items]
        todo = list(range(len(items)))
        for _ in range(8):
            todo = [i for i in todo if len(body_ids[i]) - cut[i] > 0]  # the rest: nothing left to keep
            if not todo:
                break
            bodies = self._cut_all([body_ids[i] for i in todo], [len(body_ids[i]) - cut[i] for i in todo])
            texts, ok = [], []
            for i, body in zip(todo, bodies):
                try:
                    texts.append(self._full_text(self._message(items[i][0], body)))
                    ok.append(i)
                except Exception as e:  # noqa: BLE001 - as in build_batch: a row error, never a unit failure
                    out[i] = Prompt(None, error=_row_error(e))
            todo = []
            for i, ids in zip(ok, self.codec.encode_prompts(texts, self.cfg.chat)):
                if len(ids) <= self.limit:
                    out[i] = Prompt(list(ids), truncated=True)
                else:
                    cut[i] += len(ids) - self.limit
                    todo.append(i)
        return [p if p is not None else
                Prompt(None, error=f"prompt is {n} tokens and cannot be cut to the limit of "
                                   f"{self.limit} by truncating its text")
                for p, (_, _, n) in zip(out, items)]

    def _cut_all(self, ids: list[list[int]], keep: list[int]) -> list[str]:
        """Each body's text with only ``keep`` of its tokens, by the truncation policy (one
        batched decode)."""
        policy = self.cfg.truncation
        pieces: list[list[int]] = []
        for x, k in zip(ids, keep):
            if policy == "head":
                pieces.append(x[len(x) - k:])
            elif policy == "tail":
                pieces.append(x[:k])
            elif k > 1:
                head = (k + 1) // 2
                pieces += [x[:head], x[len(x) - (k - head):]]
            else:
                pieces.append(x[:1])
        text = iter(self.codec.decode_fragments(pieces))
        if policy in ("head", "tail"):
            return list(text)
        return [next(text) + MIDDLE_MARK + next(text) if k > 1 else next(text) for k in keep]


def _messages(row: dict[str, Any], column: str) -> list[dict[str, str]]:
    """A row's chat messages, checked: a non-empty list of {role, content} strings."""
    value = row.get(column)
    if not isinstance(value, list) or not value:
        raise ValueError(f"messages are not a non-empty list (column {column!r})")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {j} is not a {{role, content}} pair of strings (column {column!r})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _row_error(e: Exception) -> str:
    """A row's error message: our own checks as they are, anything else (a template that raises
    in the sandbox, divides by zero, adds a string to a number...) with its type."""
    if isinstance(e, ValueError) and not isinstance(e, jinja2.TemplateError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def row_seed(base_seed: int, source_file: str, source_row: int, row_id: Any = None) -> int:
    """A per-row sampling seed from the job seed and the row's identity (not its batch)."""
    key = f"{base_seed}\0{source_file}\0{source_row}" if row_id is None else f"{base_seed}\0id\0{row_id!r}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a row whose seed is ``seed`` (sample 0 keeps the row's)."""
    if sample == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}\0sample\0{sample}".encode()).digest()[:4], "big") & 0x7FFFFFFF
