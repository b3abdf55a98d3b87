"""One work unit from input rows to a committed output file, around an injected generate
function (the engine lives in ``workers/``; this module never sees it).

Flow: if the unit's file is already committed, report it (a retried unit is never written
twice); else read the rows, build prompts, generate for the rows that have one, decode, and
write the unit's file atomically with its result in the file's metadata. Per-row problems
become the row's ``error``; only whole-unit problems (unreadable input, failed write) raise.
Owns ``OutputConfig``, ``SamplingConfig``, ``Generation`` and ``UnitResult`` (plain
dataclasses that cross the Ray boundary).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from .enrich import EnrichConfig, Enricher, RequestOptions, RowRequests
from .fs import exists, resolve
from .longdoc import MapReduce
from .prompts import Prompt, PromptBuilder, PromptConfig, row_seed
from .reader import read_unit, text_values
from .shards import WorkUnit
from .textfiles import ROW_ERROR_COLUMN
from .writer import RowResult, output_table, part_name, read_part_info, write_part

if TYPE_CHECKING:
    from .tokenizer import Codec


@dataclass(frozen=True)
class OutputConfig:
    uri: str
    format: str = "parquet"
    mode: str = "enrich"
    id_column: str | None = None
    staging_uri: str | None = None  # where unit files go when not in ``uri`` (sinks.py)

    @property
    def file_format(self) -> str:
        """The format of the unit files: arrow, or Parquet (every table or batch sink stages Parquet)."""
        return "arrow" if self.format == "arrow" else "parquet"

    @property
    def parts_uri(self) -> str:
        return self.staging_uri or self.uri


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # samples per row, forked from one prefill (list column ``samples``)


@dataclass
class Generation:
    """The engine's answer for one prompt, in plain types."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    logprobs: list[float] | None = None  # per token, when asked for (enrich.RequestOptions)
    scores: list[float] | None = None    # classify: each label's log-likelihood
    samples: list[list[int]] | None = None  # with n > 1: every sample's ids (token_ids is the first)


# prompts, per-row seeds[, per-request enrich.RequestOptions] -> one Generation per prompt, in order.
# A reader that carries per-row options (OpenAI Batch requests) gives each request its own
# RequestOptions (``max_new_tokens``, ``temperature``, a constraint for ``stop`` / a JSON schema).
GenerateFn = Callable[..., list[Generation]]
# per-row sampling override columns a reader may add (dropped before the output is built)
OVERRIDE_COLUMNS = {"_hymba_max_new_tokens": "max_new_tokens", "_hymba_temperature": "temperature",
                    "_hymba_stop": "stop", "_hymba_json_schema": "json_schema"}


@dataclass
class UnitResult:
    """What a worker reports for a unit (small: counts, tokens, timings, where it went)."""

    unit_id: str
    rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_path: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    worker: dict[str, str] = field(default_factory=dict)
    reused: bool = False  # the file was already committed by an earlier attempt

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("reused")
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "UnitResult":
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**known)


class UnitRunner:
    """Runs units for one actor: prompt building, generation via ``generate``, writing."""

    def __init__(self, prompt_cfg: PromptConfig, output: OutputConfig, sampling: SamplingConfig,
                 codec: Codec, engine_limit: int, generate: GenerateFn,
                 before_write: Callable[[WorkUnit], None] | None = None,
                 generate_stats: Callable[[], dict[str, float]] | None = None,
                 enrich: EnrichConfig | None = None, vocab_size: int | None = None) -> None:
        self.prompts = PromptBuilder(prompt_cfg, codec, engine_limit)
        self.enricher = (Enricher(enrich, codec, vocab_size or codec.vocab_size, sampling.max_new_tokens,
                                  chat=prompt_cfg.chat) if enrich is not None and enrich.active else None)
        self.row_requests = RowRequests(codec, vocab_size or codec.vocab_size)  # a reader's per-row options
        self.prompt_cfg, self.output, self.sampling = prompt_cfg, output, sampling
        self.codec, self.generate, self.before_write = codec, generate, before_write
        self.generate_stats = generate_stats  # engine counters after a generate call (into timings)
        self.out = resolve(output.parts_uri)
        # One unit turns its rows into prompts at a time (they read their files at once): an actor
        # starts several units together, and interleaved under the GIL they would all reach the
        # engine only when the last is ready.
        self._prepare = threading.Lock()

    def committed(self, unit: WorkUnit) -> UnitResult | None:
        path = self.out.join(part_name(unit.unit_id, self.output.file_format))
        if not exists(self.out, path):
            return None
        rows, meta = read_part_info(self.out, path)
        if rows != unit.num_rows:
            raise ValueError(f"{self.out.uri(path)}: {rows} rows committed, the unit has {unit.num_rows}")
        res = UnitResult.from_meta(meta)
        res.reused = True
        return res

    def run(self, unit: WorkUnit, worker: dict[str, str] | None = None) -> UnitResult:
        done = self.committed(unit)
        if done is not None:
            return done
        cfg, id_col = self.prompt_cfg, self.output.id_column
        map_reduce = cfg.long_input == "map_reduce"  # long texts summarized in pieces (pipeline/longdoc.py)
        t0 = time.perf_counter()
        table = read_unit(unit)  # I/O: the units in flight read at once
        read_s = time.perf_counter() - t0
        with self._prepare:
            t0 = time.perf_counter()
            table, rows, row_errors, overrides, row_opts = self._rows(unit, table)
            t1 = time.perf_counter()
            read_s += t1 - t0
            if not map_reduce:
                prompts = self.prompts.build_batch(rows)
        chunks: list[int | None] = []
        if map_reduce:
            all_seeds = [row_seed(self.sampling.seed, unit.file.uri, unit.row_start + i,
                                  rows[i].get(id_col) if id_col else None) for i in range(len(rows))]
            t2 = time.perf_counter()  # the rounds are generation time
            prompts, final, chunks = MapReduce(self.prompts, self.generate).run(rows, all_seeds)
            for i, err in enumerate(row_errors):
                if err is not None:
                    prompts[i], final[i] = Prompt(None, error=err), None
            todo = [i for i, g in enumerate(final) if g is not None]
            gens = [final[i] for i in todo]
        else:
            for i, err in enumerate(row_errors):
                if err is not None:
                    prompts[i] = Prompt(None, error=err)
            todo = [i for i, p in enumerate(prompts) if p.token_ids is not None]
            seeds = [row_seed(self.sampling.seed, unit.file.uri, unit.row_start + i,
                              rows[i].get(id_col) if id_col else None) for i in todo]
            t2 = time.perf_counter()
            todo_prompts: list[list[int]] = [prompts[i].token_ids for i in todo]  # type: ignore[misc]
            if not todo:
                gens = []
            elif self.enricher is not None:
                gens = self.enricher.run(self.generate, todo_prompts, seeds)  # type: ignore[arg-type]
            elif overrides is not None:
                gens = self.generate(todo_prompts, seeds, [row_opts[i] for i in todo])
            else:
                gens = self.generate(todo_prompts, seeds)
        if len(gens) != len(todo):
            raise RuntimeError(f"generate returned {len(gens)} outputs for {len(todo)} prompts")
        t3 = time.perf_counter()
        results = [RowResult(finish_reason="error", error=p.error, truncated=p.truncated) for p in prompts]
        for r, c in zip(results, chunks):
            r.chunks = c
        for i, g in zip(todo, gens):
            r = results[i]
            r.prompt_tokens = g.prompt_tokens or len(prompts[i].token_ids or [])
            if g.error is not None:
                r.error, r.finish_reason = g.error, "error"
            else:
                r.generated_text = self.codec.decode(g.token_ids)
                r.finish_reason, r.completion_tokens, r.error = g.finish_reason, len(g.token_ids), None
                if overrides is not None:  # a request's own stop strings
                    r.generated_text, r.finish_reason = self.row_requests.finish(r.generated_text, r.finish_reason,
                                                                                 overrides[i])
                if g.samples is not None:  # task.n > 1: every sample's text; tokens of all of them
                    r.samples = [self.codec.decode(x) for x in g.samples]
                    r.completion_tokens = sum(len(x) for x in g.samples)
        extra = self.enricher.finish(results, todo, gens) if self.enricher is not None else None
        res = UnitResult(
            unit.unit_id, rows=len(results),
            error_rows=sum(r.error is not None for r in results),
            truncated_rows=sum(r.truncated for r in results),
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            worker=dict(worker or {}),
        )
        row_fields = (("samples",) if self.sampling.n > 1 else ()) + (("chunks",) if map_reduce else ())
        out = output_table(table, results, unit, self.output.mode, id_col, extra, row_fields)
        t4 = time.perf_counter()
        res.timings = {"read_s": read_s, "prompt_s": t2 - t1, "generate_s": t3 - t2,
                       "build_s": t4 - t3}
        if todo and self.generate_stats is not None:
            res.timings.update(self.generate_stats())
        if self.before_write is not None:
            self.before_write(unit)
        res.output_path = self.out.uri(self.out.join(part_name(unit.unit_id, self.output.file_format)))
        res.timings["write_s"] = 0.0
        t5 = time.perf_counter()
        write_part(self.out, out, unit.unit_id, self.output.file_format, res.to_meta())
        res.timings["write_s"] = time.perf_counter() - t5
        return res

    def _rows(self, unit: WorkUnit, table: pa.Table) -> tuple[pa.Table, list[dict[str, Any]], list[str | None],
                                                              list[dict[str, Any]] | None, list[RequestOptions | None]]:
        """The unit's table (reader error and request-override columns dropped), its rows as
        dicts (text column decoded), each row's reader error, and the per-row overrides."""
        row_errors: list[str | None] = [None] * table.num_rows
        if ROW_ERROR_COLUMN in table.column_names:  # lines the reader could not parse
            row_errors = table.column(ROW_ERROR_COLUMN).to_pylist()
            table = table.drop_columns([ROW_ERROR_COLUMN])
        overrides, row_opts = self._overrides(unit, table, row_errors)
        if overrides is not None:
            table = table.drop_columns([c for c in OVERRIDE_COLUMNS if c in table.column_names])
        rows = table.to_pylist()
        if self.prompt_cfg.text_column is not None:
            for row, v in zip(rows, text_values(table, self.prompt_cfg.text_column, unit.file.uri)):
                row[self.prompt_cfg.text_column] = v
        return table, rows, row_errors, overrides, row_opts

    def _overrides(self, unit: WorkUnit, table: pa.Table, row_errors: list[str | None]
                   ) -> tuple[list[dict[str, Any]] | None, list[RequestOptions | None]]:
        """Per-row request options from the reader's override columns (None when it has none),
        and each row's engine request options; a request over the job's own limits, or whose
        options cannot be served (a schema that does not compile), becomes that row's error."""
        cols = [c for c in OVERRIDE_COLUMNS if c in table.column_names]
        if not cols:
            return None, []
        values = {c: table.column(c).to_pylist() for c in cols}
        out: list[dict[str, Any]] = []
        opts: list[RequestOptions | None] = []
        for i in range(table.num_rows):
            o = {OVERRIDE_COLUMNS[c]: values[c][i] for c in cols if values[c][i] is not None}
            out.append(o)
            opts.append(None)
            if row_errors[i] is not None:
                continue
            where = f"{unit.file.uri} row {unit.row_start + i}"
            limit = self.sampling.max_new_tokens
            if o.get("max_new_tokens", 0) > limit:
                row_errors[i] = (f"{where}: max_tokens {o['max_new_tokens']} is over this job's limit of {limit} "
                                 "(task.max_new_tokens)")
                continue
            try:
                opts[i] = self.row_requests.options(o)
            except ValueError as e:
                row_errors[i] = f"{where}: {e}"
        return out, opts
