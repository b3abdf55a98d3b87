"""The job spec: YAML in, a validated pydantic model out.

Every field is described (``hymba-batch validate --schema`` prints the JSON schema), unknown
fields are rejected, and every error names the field's dotted path. ``${VAR}`` (or
``${VAR:-default}``) in any string is replaced from the environment, so specs stay free of
secrets; ``--set a.b=value`` overrides any field (the value is parsed as YAML). YAML is loaded
with ``yaml.safe_load``. Knows nothing of Ray, files other than the spec, or models.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hymba_batch.pipeline.fs import check_uri
from hymba_batch.pipeline.classify import check_labels
from hymba_batch.pipeline.prompts import compile_template


def check_json_schema(schema: dict[str, Any], where: str) -> None:
    """ValueError naming the place in ``schema`` that cannot become a column type or a grammar."""
    from hymba_batch.pipeline.grammar import json_grammar
    from hymba_batch.pipeline.structured import arrow_type

    arrow_type(schema, where)
    json_grammar(schema, where)


class SpecError(ValueError):
    """The job spec is invalid; the message names the field path(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: str = Field(description="Checkpoint: a local folder, a Hugging Face repo id, or s3://bucket/prefix/ "
                                  "(downloaded once per node into the local cache).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and compute dtype; auto = bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where actors run the model; auto = CUDA when the cluster has GPUs, else CPU.")
    memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of each GPU the engines on it may use "
                                                                "in total (split between its actors).")
    cache_budget_mb: int | None = Field(None, ge=1, description="Cache memory per engine in MiB; overrides "
                                                               "memory_fraction (None: from memory_fraction on GPU, "
                                                               "the engine's default on CPU).")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences resident at once per engine (None: engine default).")
    max_batch_tokens: int | None = Field(None, ge=1, description="Prompt tokens per prefill step (None: engine default).")


class InputSpec(_Strict):
    uri: str = Field(description="Input: s3://bucket/prefix/, a local folder, one file, or a glob (a Delta "
                                 "table's root for format delta). Files and folders starting with '_' or '.' "
                                 "are skipped; Hive key=value folders become columns (Parquet).")
    format: Literal["parquet", "jsonl", "csv", "openai_batch", "delta", "iceberg"] | None = Field(
        None, description="Input format: parquet, jsonl, csv (JSONL/CSV: units are byte ranges at line "
                          "boundaries; a line that does not parse is a row error), openai_batch (OpenAI Batch "
                          "API request JSONL), delta (a Delta Lake table at input.uri), iceberg (input.uri is "
                          "the table's namespace.table in input.catalog). None: from the files' extension "
                          "(.jsonl/.ndjson, .csv, else parquet).")
    version: int | None = Field(None, ge=0, description="format delta: the table version to read (None: the "
                                                        "latest); recorded in the manifest.")
    snapshot_id: int | None = Field(None, description="format iceberg: the snapshot to read (None: the current "
                                                      "one); recorded in the manifest.")
    catalog: dict[str, str] = Field(default_factory=dict, description="format iceberg: pyiceberg catalog "
                                    "properties (e.g. type: sql, uri: sqlite:///cat.db, warehouse: s3://b/wh; or "
                                    "type: rest, uri: https://...; name: the catalog's name). Empty: pyiceberg's "
                                    "own configuration (~/.pyiceberg.yaml, PYICEBERG_CATALOG__*).")
    text_column: str | None = Field("text", description="Column holding the text to process "
                                                        "(optional for task.kind=template).")
    id_column: str | None = Field(None, description="Column identifying a row; kept in results mode and used "
                                                    "for per-row sampling seeds.")
    messages_column: str | None = Field(None, description="Column holding each row's chat as a list of "
                                                          "{role, content} structs, rendered with the checkpoint's "
                                                          "chat template; replaces input.text_column (needs task.chat).")
    rows_per_unit: int = Field(4096, ge=1, description="Target rows per work unit (whole row groups are packed "
                                                       "up to this; larger row groups are split).")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        return check_uri(v)


class TaskSpec(_Strict):
    kind: Literal["summarize", "generate", "template", "classify"] = Field(
        "summarize", description="summarize: instruction + text; generate: the text is the prompt; "
                                 "template: task.template rendered over the row's columns; classify: score "
                                 "task.labels as continuations of instruction + text (columns label, label_probs).")
    prompt: str | None = Field(None, description="Instruction placed before the text (summarize: a default "
                                                 "summarization instruction when unset).")
    template: str | None = Field(None, description="Jinja2 template over row columns (sandboxed; undefined "
                                                   "variables are errors). Required for kind=template.")
    system: str | None = Field(None, description="System message for chat prompts.")
    chat: bool = Field(True, description="Format prompts with the checkpoint's chat template.")
    max_new_tokens: int = Field(128, ge=1, le=65536, description="Most tokens generated per row.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    seed: int = Field(0, ge=0, description="Base seed; each row's seed derives from it and the row's identity, "
                                           "so output does not depend on batching or actor count.")
    max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt in tokens (None: the engine's "
                                                                 "maximum). Longer prompts follow task.truncation.")
    truncation: Literal["head", "middle", "tail", "error"] = Field(
        "middle", description="For a too-long prompt: drop tokens of the text from its head, middle or tail "
                              "(row marked truncated), or make it a row error.")
    labels: list[str] | None = Field(None, description="kind=classify: the labels (2 to 1,000 distinct strings); "
                                                        "each row gets `label` (the most likely) and `label_probs` "
                                                        "(one float64 per label, summing to 1).")
    json_schema: dict[str, Any] | None = Field(None, description="A JSON schema the output must follow (decoding is "
                                                                  "constrained; compact JSON). generated_text holds the "
                                                                  "JSON text and `structured` the value as a typed column.")
    json_schema_file: str | None = Field(None, description="The JSON schema in a file instead (a local path or s3:// "
                                                           "URI, read when the job is planned).")
    stop: list[str] | None = Field(None, max_length=8, description="Up to 8 stop strings: generation ends at the "
                                                                   "first occurrence (across token boundaries), the text "
                                                                   "is cut before it, finish_reason is stop.")
    logprobs: bool = Field(False, description="Add `token_logprobs` (each generated token's log-probability under "
                                              "the model) and `logprob` (their sum).")
    min_new_tokens: int = Field(0, ge=0, description="EOS is not allowed before this many tokens are generated.")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="Divides (multiplies, when negative) the logits "
                                                                     "of tokens already in the prompt or output; 1 = off.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted once from the logit of every token "
                                                                  "already generated (OpenAI's); 0 = off.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from a token's logit per time it was "
                                                                   "generated (OpenAI's); 0 = off.")

    @field_validator("json_schema")
    @classmethod
    def _check_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_json_schema(v, "task.json_schema")
        return v

    @field_validator("json_schema_file")
    @classmethod
    def _check_schema_file(cls, v: str | None) -> str | None:
        return check_uri(v) if v is not None else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not x for x in v):
            raise ValueError("stop strings must be non-empty")
        return v
    long_input: Literal["truncate", "map_reduce"] = Field(
        "truncate", description="A text whose prompt exceeds max_input_tokens: truncate it (task.truncation), or "
                                "map_reduce: cut it into chunks that fit (at paragraph, else sentence boundaries), "
                                "run the job's prompt on each, then on the joined results, until it fits; the row "
                                "gets one result and the column `chunks` (how many pieces).")
    share_prefix: bool = Field(True, description="Compute the prompt tokens every row starts with (chat header, "
                                                 "system message, instruction, few-shot examples) once per engine "
                                                 "and fork each row from them; found automatically as the rows' "
                                                 "longest common token prefix. Output is the same either way.")
    n: int = Field(1, ge=1, le=16, description="Samples per row: the prompt is prefilled once and forked into n "
                                               "sequences; the texts go to the list column `samples` "
                                               "(`generated_text` keeps the first). n > 1 needs temperature > 0.")

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"task.n is {self.n}: several samples need task.temperature > 0 "
                             "(greedy samples would all be the same)")
        if self.kind == "template":
            if not self.template:
                raise ValueError("task.template is required when task.kind is 'template'")
            compile_template(self.template)
        elif self.template:
            raise ValueError(f"task.template is only used with task.kind 'template' (kind is {self.kind!r})")
        if self.kind == "classify":
            check_labels(self.labels or [])
            used = [f for f in ("json_schema", "json_schema_file", "stop", "logprobs") if getattr(self, f)]
            if used:
                raise ValueError(f"task.{used[0]} is not used with task.kind 'classify'")
        elif self.labels:
            raise ValueError(f"task.labels is only used with task.kind 'classify' (kind is {self.kind!r})")
        if self.json_schema is not None and self.json_schema_file is not None:
            raise ValueError("task.json_schema and task.json_schema_file: give one, not both")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("task.min_new_tokens must not exceed task.max_new_tokens")
        if self.min_new_tokens and (self.json_schema is not None or self.json_schema_file):
            raise ValueError("task.min_new_tokens is not used with a JSON schema (the schema decides where the value ends)")
        return self


class OutputSpec(_Strict):
    uri: str = Field(description="Output prefix (s3://bucket/prefix/ or a local folder); one file per unit, "
                                 "_hymba/manifest.json and _SUCCESS when complete.")
    format: Literal["parquet", "arrow", "openai_batch", "delta", "iceberg"] = Field(
        "parquet", description="parquet or arrow (Arrow IPC): one file per unit plus a manifest; openai_batch: "
                               "output.jsonl in the OpenAI Batch API's output shape; delta: a Delta Lake table at "
                               "output.uri, one atomic commit per run; iceberg: appended to output.table in one "
                               "snapshot per run (data files stay under output.uri).")
    table: str | None = Field(None, description="format iceberg: the table (namespace.table), created from the "
                                                "output's columns when it does not exist.")
    catalog: dict[str, str] = Field(default_factory=dict, description="format iceberg: pyiceberg catalog "
                                    "properties, as input.catalog.")
    mode: Literal["enrich", "results"] = Field("enrich", description="enrich: keep every input column; "
                                                                     "results: only the id column and the results.")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        return check_uri(v)


class ResourcesSpec(_Strict):
    ray_address: str | None = Field(None, description="Ray cluster to join (None: the running one, or start local "
                                                      "Ray; 'local': always a new local Ray, stopped with the run).")
    num_actors: int | None = Field(None, ge=1, description="Inference actors (None: GPUs x actors_per_gpu, or 1 on CPU).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs to use (None: all the cluster has).")
    actors_per_gpu: int = Field(1, ge=1, le=16, description="Actors sharing one GPU; each gets num_gpus=1/k "
                                                           "and 1/k of the GPU memory.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor (its torch threads on CPU).")
    max_in_flight: int | None = Field(None, ge=1, le=64, description=(
        "Units queued or running per actor. Unset: enough units that their rows cover twice the "
        "actor's engine slots (2 to 16), so the engine never runs dry between units."))
    max_attempts: int = Field(3, ge=1, description="Tries per unit before it is quarantined as failed.")


_DURATION = re.compile(r"^\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$")


def parse_duration(text: str, what: str = "duration") -> int:
    """Seconds in ``text``: ``90``, ``45s``, ``30m``, ``1h``, ``1h30m``, ``2d``; ValueError naming ``what``."""
    raw = str(text).strip().lower()
    if raw.isdigit():
        secs = int(raw)
    else:
        m = _DURATION.match(raw)
        if not raw or not m or not any(m.groups()):
            raise ValueError(f"{what}: {text!r} is not a duration (e.g. 90, 45s, 30m, 1h, 1h30m, 2d)")
        d, h, mi, se = (int(g or 0) for g in m.groups())
        secs = ((d * 24 + h) * 60 + mi) * 60 + se
    if secs <= 0:
        raise ValueError(f"{what}: {text!r} must be longer than zero")
    return secs


class ScheduleSpec(_Strict):
    incremental: bool = Field(False, description="Process only input files that no earlier run into output.uri "
                                                 "processed, or that changed since (by path, size and "
                                                 "modification time); each run commits its own manifest "
                                                 "(same as `run --incremental`).")
    lease_ttl: int = Field(900, ge=1, le=7 * 86400,
                           description="Seconds a run's lease (output.uri/_hymba/lease.json; every run holds "
                                       "one, so two runs never share an output) lives without renewal. The "
                                       "running job renews it with its heartbeat (every HYMBA_HEARTBEAT_S, 5 s, "
                                       "at most lease_ttl/3 s); a crashed run's lease is taken over once it is "
                                       "this old (at once when the crashed process ran on the same host).")
    window: str = Field("1h", description="Schedule window (a duration: 30m, 1h, 1d). `hymba-batch submit` of an "
                                          "incremental job names its submission after the current UTC window, so "
                                          "a second submission in the same window is refused by Ray.")

    @model_validator(mode="after")
    def _check(self) -> "ScheduleSpec":
        parse_duration(self.window, "schedule.window")
        return self


class JobSpec(_Strict):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Job name (for status and logs).")
    model: ModelSpec = Field(description="The checkpoint and how to run it.")
    input: InputSpec = Field(description="Where the rows come from.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="What to generate per row.")
    output: OutputSpec = Field(description="Where the results go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray actors and GPUs.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Scheduled incremental runs.")

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if self.output.format == "openai_batch" and self.input.format != "openai_batch" and not self.input.id_column:
            raise ValueError("output.format 'openai_batch' needs a custom_id per row: input.format 'openai_batch' "
                             "or input.id_column")
        if self.output.format == "openai_batch" and self.schedule.incremental:
            raise ValueError("output.format 'openai_batch' writes one output file per job; it has no incremental runs")
        if self.output.format == "iceberg" and not self.output.table:
            raise ValueError("output.table (namespace.table) is required when output.format is 'iceberg'")
        if self.input.snapshot_id is not None and self.input.format != "iceberg":
            raise ValueError("input.snapshot_id is only used with input.format 'iceberg'")
        if self.input.version is not None and self.input.format != "delta":
            raise ValueError("input.version is only used with input.format 'delta'")
        if self.input.format == "openai_batch":
            return self  # the prompt is the request's messages
        if self.input.messages_column:
            if self.task.kind == "template":
                raise ValueError("input.messages_column is not used with task.kind 'template'")
            if not self.task.chat:
                raise ValueError("input.messages_column needs task.chat: true (the chat template renders it)")
        elif self.task.kind != "template" and not self.input.text_column:
            raise ValueError(f"input.text_column is required when task.kind is {self.task.kind!r}")
        if self.task.long_input == "map_reduce" and not self.input.text_column:
            raise ValueError("input.text_column is required when task.long_input is 'map_reduce' (the text to cut)")
        return self


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(obj: Any, path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; SpecError names the field."""
    if isinstance(obj, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is None:
                    raise SpecError(f"{path}: environment variable {m.group(1)} is not set")
                return m.group(2)
            return val
        return _VAR.sub(sub, obj)
    return obj


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override (value parsed as YAML) to the raw spec dict."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise SpecError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw  # "Say: hi" is a string, not a mapping; explicit {..} / [..] stay structured
    cur = data
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return f"{source}: invalid job spec\n" + "\n".join(lines)


def parse_spec(data: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "spec") -> JobSpec:
    """Validate a raw spec dict (after overrides and interpolation)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    data = interpolate(data)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load a YAML job spec file, apply ``--set`` overrides and ``${ENV}`` interpolation."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read the job spec ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML ({e})") from e
    return parse_spec(data, overrides, source=str(p))
