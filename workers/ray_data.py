"""A Ray Data stage for teams with their own Ray Data pipelines, built like
``ray.data.llm.build_llm_processor``: a config (model, engine and sampling settings,
``concurrency``, ``batch_size``, GPUs per actor), ``preprocess`` / ``postprocess`` row
functions, and a processor that maps a ``ray.data.Dataset`` to a ``Dataset`` with the job's
generated columns (``generated_text``, ``finish_reason``, ``prompt_tokens``,
``completion_tokens``, ``truncated``, ``error``).

    processor = build_hymba_processor(
        HymbaProcessorConfig(model_source="nvidia/Hymba-1.5B-Instruct", concurrency=2, batch_size=64),
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["text"]}],
                                "sampling_params": {"max_tokens": 64}},
        postprocess=lambda row: {"id": row["id"], "summary": row["generated_text"]})
    ds = processor(ray.data.read_parquet("s3://bucket/articles/"))

``preprocess`` returns a row with ``messages`` (chat turns) or ``prompt`` (text), and
optionally ``sampling_params`` (``max_tokens``, ``temperature``); its other keys pass through.
The engine lives in an actor pool (``map_batches`` with a callable class: one model per actor,
each batch joins its continuous batch). A row whose prompt cannot be built, or that the engine
rejects, gets its ``error`` and stays in the dataset.

Delivery is Ray Data's: at least once. A failed task is re-executed and whatever the pipeline
writes may then hold a row twice; nothing records which rows were done, so a stopped pipeline
starts over. For exactly-once output with resume, manifests and incremental runs, use a
hymba-batch job (``hymba-batch run``) instead. Joins the model and the data plane, so it lives here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from hymba_batch.pipeline.enrich import RequestOptions
from hymba_batch.pipeline.prompts import Prompt, PromptConfig, row_seed
from hymba_batch.pipeline.unit import OutputConfig, SamplingConfig
from hymba_batch.pipeline.writer import OUTPUT_SCHEMA

from .actor import ActorConfig

if TYPE_CHECKING:
    import ray.data

    from hymba_batch.jobs.spec import JobSpec

Row = dict[str, Any]
GENERATED = [f.name for f in OUTPUT_SCHEMA if not f.name.startswith("_source")]


@dataclass(frozen=True)
class HymbaProcessorConfig:
    """Model, engine, sampling and pool settings of a Ray Data stage (defaults as a job's)."""

    model_source: str  # checkpoint folder, Hugging Face repo id, or s3://bucket/prefix/
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # cache_budget_mb, max_num_seqs, max_batch_tokens
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # defaults; rows may override
    chat: bool = True  # format rows with the checkpoint's chat template
    system: str | None = None  # system message for ``prompt`` rows
    max_input_tokens: int | None = None
    concurrency: int = 1  # actors in the pool
    batch_size: int = 64  # rows per map_batches call
    num_gpus: float = 0.0  # GPUs per actor (1/k for k actors per GPU, as resources.actors_per_gpu)
    num_cpus: float = 1.0  # CPUs per actor

    @classmethod
    def from_spec(cls, spec: JobSpec, concurrency: int = 1, batch_size: int = 64,
                  num_gpus: float | None = None) -> HymbaProcessorConfig:
        """The model, engine and sampling settings of a job spec (GPUs per actor 1/actors_per_gpu
        when the spec's device is not cpu and ``num_gpus`` is not given)."""
        m, t, r = spec.model, spec.task, spec.resources
        gpus = num_gpus if num_gpus is not None else (0.0 if m.device == "cpu" else 1.0 / r.actors_per_gpu)
        return cls(model_source=m.path, dtype=m.dtype, device=m.device,
                   engine_kwargs={k: v for k, v in (("cache_budget_mb", m.cache_budget_mb),
                                                    ("max_num_seqs", m.max_num_seqs),
                                                    ("max_batch_tokens", m.max_batch_tokens)) if v},
                   sampling=SamplingConfig(max_new_tokens=t.max_new_tokens, temperature=t.temperature,
                                           top_p=t.top_p, top_k=t.top_k, seed=t.seed),
                   chat=t.chat, system=t.system, max_input_tokens=t.max_input_tokens,
                   concurrency=concurrency, batch_size=batch_size, num_gpus=gpus, num_cpus=r.cpus_per_actor)

    def actor_config(self) -> ActorConfig:
        ek = self.engine_kwargs
        kind = "messages" if self.chat else "generate"
        return ActorConfig(
            model_path=self.model_source, dtype=self.dtype, device=self.device,
            cache_budget_bytes=int(ek["cache_budget_mb"]) << 20 if ek.get("cache_budget_mb") else None,
            max_num_seqs=ek.get("max_num_seqs"), max_batch_tokens=ek.get("max_batch_tokens"),
            cpu_threads=max(1, int(self.num_cpus)) if self.num_gpus == 0 else None,
            prompt=PromptConfig(kind=kind, text_column="_hymba_prompt", chat=self.chat,
                                max_input_tokens=self.max_input_tokens, truncation="error"),
            output=OutputConfig(uri=tempfile.gettempdir()),  # never written: rows go back to Ray Data
            sampling=self.sampling)


class HymbaUDF:
    """The callable class Ray Data runs in each pool actor: one engine, many batches."""

    def __init__(self, config: HymbaProcessorConfig) -> None:
        from .actor import InferenceActor

        self.config = config
        self.actor = InferenceActor(config.actor_config())

    def _prompt_text(self, row: Row) -> str:
        c = self.config
        if "messages" in row and row["messages"] is not None:
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
        elif isinstance(row.get("prompt"), str):
            if not c.chat:
                return row["prompt"]
            msgs = ([{"role": "system", "content": c.system}] if c.system else []) + \
                [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError("the row has neither 'messages' nor a string 'prompt' (check preprocess)")
        if not c.chat:
            raise ValueError("'messages' rows need chat=True")
        return json.dumps(msgs)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows: list[Row] = batch.to_pylist()
        builder, limit = self.actor.runner.prompts, self.config.sampling.max_new_tokens
        prompts: list[Prompt] = [Prompt(None)] * len(rows)
        staged: list[Row] = []
        where: list[int] = []
        overrides: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            try:
                sp = row.get("sampling_params") or {}
                o = {}
                if sp.get("max_tokens") is not None:
                    o["max_new_tokens"] = int(sp["max_tokens"])
                    if o["max_new_tokens"] > limit or o["max_new_tokens"] < 1:
                        raise ValueError(f"sampling_params.max_tokens {sp['max_tokens']} is not in 1..{limit} "
                                         f"(the config's sampling.max_new_tokens)")
                if sp.get("temperature") is not None:
                    o["temperature"] = float(sp["temperature"])
                staged.append({"_hymba_prompt": self._prompt_text(row)})
                where.append(i)
                overrides.append(o)
            except Exception as e:  # noqa: BLE001 - a bad row is that row's error
                prompts[i] = Prompt(None, error=f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        for i, p in zip(where, builder.build_batch(staged)):
            prompts[i] = p
        todo = [k for k, i in enumerate(where) if prompts[i].token_ids is not None]
        ids = [where[k] for k in todo]
        seeds = [row_seed(self.config.sampling.seed, "ray-data", 0, staged[k]["_hymba_prompt"]) for k in todo]
        options = [RequestOptions(**overrides[k]) for k in todo]  # a row's own max_tokens / temperature
        gens = self.actor._generate([prompts[i].token_ids for i in ids], seeds, options) if ids else []
        out = {name: [None] * len(rows) for name in GENERATED}
        out["prompt_tokens"] = [0] * len(rows)
        out["completion_tokens"] = [0] * len(rows)
        out["truncated"] = [False] * len(rows)
        for i, p in enumerate(prompts):
            if p.token_ids is None:
                out["error"][i], out["finish_reason"][i] = p.error, "error"
        for i, g in zip(ids, gens):
            out["prompt_tokens"][i] = g.prompt_tokens or len(prompts[i].token_ids or [])
            if g.error is not None:
                out["error"][i], out["finish_reason"][i] = g.error, "error"
            else:
                out["generated_text"][i] = self.actor.codec.decode(g.token_ids)
                out["finish_reason"][i], out["completion_tokens"][i] = g.finish_reason, len(g.token_ids)
        table = batch.drop_columns([c for c in GENERATED if c in batch.column_names])
        for f in OUTPUT_SCHEMA:
            if f.name in out:
                table = table.append_column(f, pa.array(out[f.name], type=f.type))
        return table


def build_hymba_processor(config: HymbaProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                          postprocess: Callable[[Row], Row] | None = None
                          ) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A processor: ``processor(ds)`` is ``ds`` with the generated columns (lazy, like any
    Dataset transform), through ``preprocess`` before and ``postprocess`` after."""
    if config.concurrency < 1 or config.batch_size < 1:
        raise ValueError("concurrency and batch_size must be >= 1")

    def processor(ds: ray.data.Dataset) -> ray.data.Dataset:
        if preprocess is not None:
            ds = ds.map(preprocess)
        ds = ds.map_batches(HymbaUDF, fn_constructor_args=(config,), batch_size=config.batch_size,
                            batch_format="pyarrow", concurrency=config.concurrency,
                            num_gpus=config.num_gpus or None, num_cpus=config.num_cpus)
        if postprocess is not None:
            ds = ds.map(postprocess)
        return ds

    return processor
