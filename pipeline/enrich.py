"""Enrichment extras of a unit: what a job asks beyond free text, from engine requests to typed
output columns.

- ``task.json_schema``: each row's decoding is constrained by the schema's grammar (grammar.py);
  ``structured`` holds the value, typed from the schema (structured.py). A row cut by
  ``max_new_tokens`` or whose JSON does not fit gets a row ``error`` and a null ``structured``.
- ``task.kind: classify``: one forced-decoding request per (row, label) (classify.py); the row
  gets ``label`` and ``label_probs`` (a struct, one float64 per label, summing to 1), and
  ``generated_text`` is the label.
- ``task.stop``: a stop-string watcher per request (stops.py) and the text cut before the stop
  string (``finish_reason`` ``stop``).
- ``task.logprobs``: ``token_logprobs`` (list<float32>) and ``logprob`` (their sum).

``Enricher.run`` turns a unit's prompts into engine requests (``RequestOptions`` per request)
through the injected generate function and back into one ``Generation`` per row;
``Enricher.finish`` fixes up the rows' results and returns the extra columns. Knows nothing of
models or Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from .classify import ForcedTokens, check_labels, label_probs
from .stops import AllOf, StopStrings, cut_at_stop
from .structured import arrow_type, parse_structured

if TYPE_CHECKING:
    from .tokenizer import Codec
    from .unit import Generation
    from .writer import RowResult


@dataclass(frozen=True)
class EnrichConfig:
    """The job's decoding extras (a plain copy of the spec's task fields)."""

    kind: str = "generate"            # classify, or any generating kind
    labels: tuple[str, ...] = ()
    json_schema: str | None = None    # the schema as JSON text (inline, or read from its file by the driver)
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @property
    def active(self) -> bool:
        return self.kind == "classify" or bool(self.json_schema or self.stop or self.logprobs)

    def column_names(self) -> list[str]:
        """The output columns these extras add."""
        if self.kind == "classify":
            return ["label", "label_probs"]
        return (["structured"] if self.json_schema else []) + (["token_logprobs", "logprob"] if self.logprobs else [])


@dataclass
class RequestOptions:
    """One engine request's options beyond the job's sampling settings."""

    constraint: Any = None             # an object of the engine's constraint interface, or None
    max_new_tokens: int | None = None  # None: the job's
    temperature: float | None = None   # None: the job's (an OpenAI Batch request's own)
    score_only: bool = False           # scoring: greedy, no penalties or min_new_tokens
    logprobs: bool = False


def label_tokens(codec: "Codec", label: str, chat: bool) -> list[int]:
    """A label's tokens as the model would write them at the start of its answer: for chat
    prompts, as tokenized right after the chat template's assistant opener (after its newline:
    ``positive`` -> ``pos itive``, not ``_positive``); for plain prompts, as a word after a space."""
    if chat:
        base = codec.chat_text("x")
        head = codec.encode_prompts([base], chat=True)[0]
        full = codec.encode_prompts([base + label], chat=True)[0]
        if full[:len(head)] == head and len(full) > len(head):
            return full[len(head):]
    return codec.encode_fragment(label)


GenerateWithOptions = Callable[[list[list[int]], list[int], list[RequestOptions]], list["Generation"]]


def _one(parts: list[Any]) -> Any:
    """A request's constraints as one constraint (None when there are none)."""
    return None if not parts else parts[0] if len(parts) == 1 else AllOf(parts)


class RowRequests:
    """A reader's per-row request options (an OpenAI Batch line's own ``max_new_tokens``,
    ``temperature``, ``stop`` and JSON schema) as engine requests, and each row's text fixed up
    after generation. A schema is compiled once per distinct schema (per actor)."""

    def __init__(self, codec: "Codec", vocab_size: int) -> None:
        self.codec, self.vocab_size = codec, vocab_size
        self._grammars: dict[str, Any] = {}  # schema text -> JsonGrammar, or the error it raised

    def options(self, o: dict[str, Any]) -> RequestOptions:
        """The request of one row's options; ValueError naming the field it cannot serve."""
        parts: list[Any] = []
        if o.get("json_schema"):
            grammar = self._grammar(o["json_schema"])
            parts.append(grammar.constraint())
        stops = self.stops(o)
        if stops:
            parts.append(StopStrings(stops, self.codec.decode_fragment))
        return RequestOptions(constraint=_one(parts), max_new_tokens=o.get("max_new_tokens"),
                              temperature=o.get("temperature"))

    def _grammar(self, schema: str) -> Any:
        from .grammar import JsonGrammar  # llguidance: only for rows with a schema
        from .structured import SchemaError

        got = self._grammars.get(schema)
        if got is None:
            try:
                got = JsonGrammar(json.loads(schema), self.codec.hf, self.vocab_size,
                                  where="body.response_format.json_schema.schema")
            except SchemaError as e:
                got = ValueError(str(e))
            self._grammars[schema] = got
        if isinstance(got, ValueError):
            raise ValueError(str(got))
        return got

    @staticmethod
    def stops(o: dict[str, Any]) -> tuple[str, ...]:
        return tuple(json.loads(o["stop"])) if o.get("stop") else ()

    def finish(self, text: str, finish_reason: str, o: dict[str, Any]) -> tuple[str, str]:
        """The row's text cut before its first stop string (``finish_reason`` ``stop`` then)."""
        stops = self.stops(o)
        if stops:
            text, hit = cut_at_stop(text, stops)
            if hit:
                finish_reason = "stop"
        return text, finish_reason


class Enricher:
    """Builds one unit's requests and its extra columns (one per actor: the grammar is compiled once)."""

    def __init__(self, cfg: EnrichConfig, codec: "Codec", vocab_size: int, max_new_tokens: int,
                 chat: bool = False) -> None:
        self.cfg, self.codec = cfg, codec
        self.arrow: pa.DataType | None = None
        self.grammar = None
        if cfg.json_schema:
            from .grammar import JsonGrammar  # llguidance: only for jobs with a schema

            schema = json.loads(cfg.json_schema)
            self.arrow = arrow_type(schema)
            self.grammar = JsonGrammar(schema, codec.hf, vocab_size)
        self.label_ids: list[list[int]] = []
        if cfg.kind == "classify":
            check_labels(cfg.labels)
            self.label_ids = [label_tokens(codec, x, chat) for x in cfg.labels]
            for label, ids in zip(cfg.labels, self.label_ids):
                if not ids or len(ids) > max_new_tokens:
                    raise ValueError(f"task.labels: {label!r} is {len(ids)} tokens; at most task.max_new_tokens "
                                     f"({max_new_tokens})")

    def _constraint(self) -> Any:
        parts: list[Any] = []
        if self.grammar is not None:
            parts.append(self.grammar.constraint())
        if self.cfg.stop:
            parts.append(StopStrings(self.cfg.stop, self.codec.decode_fragment))
        return _one(parts)

    def run(self, generate: GenerateWithOptions, prompts: list[list[int]], seeds: list[int]) -> list["Generation"]:
        """One Generation per prompt (for classify: the labels' log-likelihoods in ``scores``)."""
        from .unit import Generation

        if self.cfg.kind != "classify":
            opts = [RequestOptions(constraint=self._constraint(), logprobs=self.cfg.logprobs) for _ in prompts]
            return generate(prompts, seeds, opts)
        L = len(self.label_ids)
        req_prompts = [p for p in prompts for _ in range(L)]
        req_seeds = [s for s in seeds for _ in range(L)]
        opts = [RequestOptions(ForcedTokens(ids), max_new_tokens=len(ids), score_only=True, logprobs=True)
                for _ in prompts for ids in self.label_ids]
        gens = generate(req_prompts, req_seeds, opts)
        out = []
        for i, p in enumerate(prompts):
            mine = gens[i * L:(i + 1) * L]
            bad = next((g for g in mine if g.error is not None or g.logprobs is None), None)
            if bad is not None:
                out.append(Generation([], "error", bad.prompt_tokens or len(p), bad.error or "label scoring failed"))
            else:
                out.append(Generation([], "stop", mine[0].prompt_tokens or len(p),
                                      scores=[float(sum(g.logprobs or [])) for g in mine]))
        return out

    def finish(self, results: list["RowResult"], todo: list[int], gens: list["Generation"]) -> dict[str, pa.Array]:
        """Fix up the generated rows' results; the extra columns (nulls for rows without output)."""
        n = len(results)
        cfg = self.cfg
        cols: dict[str, list[Any]] = {name: [None] * n for name in cfg.column_names()}
        for i, g in zip(todo, gens):
            r = results[i]
            if r.error is not None:
                continue
            if cfg.kind == "classify":
                probs = label_probs(g.scores or [])
                best = max(range(len(probs)), key=probs.__getitem__)
                r.generated_text, r.completion_tokens = cfg.labels[best], 0
                cols["label"][i] = cfg.labels[best]
                cols["label_probs"][i] = dict(zip(cfg.labels, probs))
                continue
            if cfg.stop and r.generated_text is not None:
                r.generated_text, hit = cut_at_stop(r.generated_text, cfg.stop)
                if hit:
                    r.finish_reason = "stop"
            if cfg.logprobs and g.logprobs is not None:
                cols["token_logprobs"][i] = list(g.logprobs)
                cols["logprob"][i] = float(sum(g.logprobs))
            if self.arrow is not None:
                if r.finish_reason == "length":
                    r.error = (f"the JSON value was cut by task.max_new_tokens ({r.completion_tokens} tokens) "
                               "before it closed")
                else:
                    cols["structured"][i], r.error = parse_structured(r.generated_text or "", self.arrow)
        return {name: pa.array(values, type=self._type(name)) for name, values in cols.items()}

    def _type(self, name: str) -> pa.DataType:
        if name == "structured":
            assert self.arrow is not None
            return self.arrow
        if name == "label_probs":
            return pa.struct([pa.field(x, pa.float64(), nullable=False) for x in self.cfg.labels])
        return {"label": pa.string(), "token_logprobs": pa.list_(pa.float32()), "logprob": pa.float64()}[name]
