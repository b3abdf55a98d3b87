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
from hymba_batch.pipeline.prompts import compile_template


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
    uri: str = Field(description="Parquet input: s3://bucket/prefix/, a local folder, one file, or a glob. "
                                 "Files and folders starting with '_' or '.' are skipped; Hive key=value "
                                 "folders become columns.")
    text_column: str | None = Field("text", description="Column holding the text to process "
                                                        "(optional for task.kind=template).")
    id_column: str | None = Field(None, description="Column identifying a row; kept in results mode and used "
                                                    "for per-row sampling seeds.")
    rows_per_unit: int = Field(4096, ge=1, description="Target rows per work unit (whole row groups are packed "
                                                       "up to this; larger row groups are split).")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        return check_uri(v)


class TaskSpec(_Strict):
    kind: Literal["summarize", "generate", "template"] = Field(
        "summarize", description="summarize: instruction + text; generate: the text is the prompt; "
                                 "template: task.template rendered over the row's columns.")
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

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.kind == "template":
            if not self.template:
                raise ValueError("task.template is required when task.kind is 'template'")
            compile_template(self.template)
        elif self.template:
            raise ValueError(f"task.template is only used with task.kind 'template' (kind is {self.kind!r})")
        return self


class OutputSpec(_Strict):
    uri: str = Field(description="Output prefix (s3://bucket/prefix/ or a local folder); one file per unit, "
                                 "_hymba/manifest.json and _SUCCESS when complete.")
    format: Literal["parquet", "arrow"] = Field("parquet", description="File format: parquet or Arrow IPC (arrow).")
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
    max_in_flight: int = Field(2, ge=1, le=64, description="Units queued or running per actor.")
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
        if self.task.kind != "template" and not self.input.text_column:
            raise ValueError(f"input.text_column is required when task.kind is {self.task.kind!r}")
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
