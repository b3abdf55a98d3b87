"""The inference actor: loads the model once, owns its Engine, and runs work units end to end
(read, prompt, generate, write). Only a ``WorkUnit`` comes in and a ``UnitResult`` goes out.

Placement: with a GPU visible (Ray gives the actor ``num_gpus = 1/actors_per_gpu``) the model
runs on CUDA and the engine takes its share of the GPU memory; with none it runs on the CPU.
On CUDA, ``HYMBA_TRITON_SEED`` (the image sets it) names kernels compiled at build time: the
entries the node's Triton cache lacks are copied into it before the model loads.
Test hooks: ``HYMBA_FAULT_CRASH_ONCE=<path>`` makes the first actor that reaches a unit's write
create ``<path>`` and exit the process at once (mid-unit), to prove retries lose nothing;
``HYMBA_FAULT_POISON_UNIT=<text>`` makes every actor that starts a unit whose id contains
``<text>`` exit at once (a unit that kills its process every time, like a crashing kernel);
``HYMBA_FAULT_KILL_UNIT=<text>[,<text>...]`` makes every actor that starts such a unit SIGKILL its own
process, as Ray's memory monitor and the kernel's OOM killer do to a process that grew too big;
``HYMBA_FAULT_HOG_UNIT=<text>`` makes an actor that starts such a unit allocate memory until
Ray's memory monitor kills it (a row that blows the actor's memory);
``HYMBA_FAULT_ENOSPC_UNIT=<text>`` makes the output write of such a unit fail with ENOSPC, as a
full local disk would;
``HYMBA_FAULT_ENGINE_ERROR_ONCE=<path>`` makes one engine step raise, as a device error would;
``HYMBA_FAULT_BUSY_DIR=<dir>`` makes an actor hold ``<dir>/busy-<node id>`` (its pid inside)
while it runs a unit, so a test can take a node down exactly while its actor is mid-unit.

Engine failures: prompts are limited to what the cache can hold next to ``max_new_tokens``
(a longer one is truncated or a row error, never an engine out-of-memory), and when the engine
does fail (a CUDA error leaves the process's context unusable), the actor exits: Ray restarts
it with a fresh model and the pool retries its units.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

from hymba_batch.pipeline.enrich import EnrichConfig, RequestOptions
from hymba_batch.pipeline.prompts import PromptConfig, sample_seed
from hymba_batch.pipeline.shards import WorkUnit
from hymba_batch.pipeline.tokenizer import load_codec
from hymba_batch.pipeline.unit import Generation, OutputConfig, SamplingConfig, UnitResult, UnitRunner
from hymba_batch.workers.prefix import SharedPrefix

from .metrics import ActorMetrics, actor_label

CRASH_ONCE_ENV = "HYMBA_FAULT_CRASH_ONCE"
POISON_UNIT_ENV = "HYMBA_FAULT_POISON_UNIT"
ENGINE_ERROR_ONCE_ENV = "HYMBA_FAULT_ENGINE_ERROR_ONCE"
KILL_UNIT_ENV = "HYMBA_FAULT_KILL_UNIT"
ENOSPC_UNIT_ENV = "HYMBA_FAULT_ENOSPC_UNIT"
HOG_UNIT_ENV = "HYMBA_FAULT_HOG_UNIT"
BUSY_DIR_ENV = "HYMBA_FAULT_BUSY_DIR"
TRITON_SEED_ENV = "HYMBA_TRITON_SEED"  # a Triton cache precompiled for the node's GPUs (model/precompile.py)
ENGINE_FAILED_EXIT = 19


@dataclass(frozen=True)
class ActorConfig:
    """Everything an actor needs to build its engine and run units (plain, picklable)."""

    model_path: str
    prompt: PromptConfig
    output: OutputConfig
    sampling: SamplingConfig
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    memory_fraction: float = 0.9  # of the whole GPU, already divided by actors per GPU
    cache_budget_bytes: int | None = None
    max_num_seqs: int | None = None
    max_batch_tokens: int | None = None
    cpu_threads: int | None = None
    enrich: EnrichConfig | None = None  # JSON schema, classify labels, stop strings, logprobs
    job_id: str = ""  # the ``job`` tag of this actor's metrics
    share_prefix: bool = True  # fork every request from the job's common prompt prefix (workers/prefix.py)


def request_params(s: SamplingConfig, seeds: list[int], options: list[RequestOptions] | None,
                   eos: int) -> list:
    """The engine's SamplingParams of each request: the job's sampling settings, a row seed, and
    the request's enrichment options (a scoring request is greedy, without penalties)."""
    from hymba_batch.model.engine.api import SamplingParams

    opts = options if options is not None else [RequestOptions()] * len(seeds)
    out = []
    for seed, o in zip(seeds, opts, strict=True):
        plain = o.score_only
        out.append(SamplingParams(
            max_new_tokens=o.max_new_tokens or s.max_new_tokens,
            temperature=0.0 if plain else (s.temperature if o.temperature is None else o.temperature),
            top_p=s.top_p, top_k=s.top_k, seed=seed, stop_token_ids=(eos,),
            min_new_tokens=0 if plain else s.min_new_tokens,
            repetition_penalty=1.0 if plain else s.repetition_penalty,
            presence_penalty=0.0 if plain else s.presence_penalty,
            frequency_penalty=0.0 if plain else s.frequency_penalty,
            logprobs=o.logprobs, constraint=o.constraint))
    return out


def generations(outs: list) -> list[Generation]:
    """The engine's RequestOutputs as the pipeline's plain Generations."""
    return [Generation(list(o.token_ids), o.finish_reason or "error", o.prompt_tokens, o.error,
                       logprobs=o.logprobs) for o in outs]


def _crash_hook(unit: WorkUnit) -> None:
    text = os.environ.get(ENOSPC_UNIT_ENV)
    if text and text in unit.unit_id:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"part-{unit.unit_id}")
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, unit.unit_id.encode())
    os.close(fd)
    os._exit(17)


def _engine_fault_hook(engine) -> None:
    """Test hook: ``HYMBA_FAULT_ENGINE_ERROR_ONCE=<path>`` makes the first engine step of the first
    actor that creates ``<path>`` raise, as a device error would."""
    marker = os.environ.get(ENGINE_ERROR_ONCE_ENV)
    if not marker:
        return
    real_step = engine.step

    def step():
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return real_step()
        os.close(fd)
        raise RuntimeError("injected engine failure")

    engine.step = step


def _poison_hook(unit: WorkUnit) -> None:
    text = os.environ.get(POISON_UNIT_ENV)
    if text and text in unit.unit_id:
        os._exit(18)
    text = os.environ.get(KILL_UNIT_ENV)
    if text and any(t and t in unit.unit_id for t in text.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)  # what an out-of-memory kill looks like from outside
    text = os.environ.get(HOG_UNIT_ENV)
    if text and text in unit.unit_id:
        hog = []
        for _ in range(160):  # up to 16 GB, 100 MB at a time (pages touched), until the monitor kills us
            hog.append(bytearray(b"\x01") * (100 << 20))
            time.sleep(0.02)
        raise RuntimeError("memory hog test hook: Ray's memory monitor did not kill this actor")


class InferenceActor:
    """One engine, many units. Ray wraps this class (see ``pool``)."""

    def __init__(self, cfg: ActorConfig) -> None:
        t0 = time.perf_counter()
        import torch

        from hymba_batch.model import load_model
        from hymba_batch.model.engine import Engine, EngineConfig
        from hymba_batch.model.engine.threaded import ThreadedEngine
        from hymba_batch.model.loader import resolve_checkpoint

        self.cfg = cfg
        t_import = time.perf_counter()
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise RuntimeError("model.device is 'cuda' but this actor sees no CUDA device")
        device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and cuda)) else "cpu"
        dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        folder = resolve_checkpoint(cfg.model_path)
        seed, kernel_cache = os.environ.get(TRITON_SEED_ENV), os.environ.get("TRITON_CACHE_DIR")
        if device == "cuda" and seed and kernel_cache:  # the image's precompiled kernels (infra/Dockerfile)
            from hymba_batch.model.precompile import seed_cache
            seed_cache(seed, kernel_cache)
        t_resolve = time.perf_counter()
        self.model = load_model(folder, device=device, dtype=getattr(torch, dtype_name))
        t_load = time.perf_counter()
        ekw: dict = {"memory_fraction": cfg.memory_fraction}
        if cfg.cache_budget_bytes:
            ekw["memory_budget_bytes"] = cfg.cache_budget_bytes
        if cfg.max_num_seqs:
            ekw["max_num_seqs"] = cfg.max_num_seqs
        if cfg.max_batch_tokens:
            ekw["max_batch_tokens"] = cfg.max_batch_tokens
        self.engine = Engine(self.model, EngineConfig(**ekw))
        self.frontend = ThreadedEngine(self.engine)  # units in flight share one continuous batch
        self.prefix = SharedPrefix(self.frontend) if cfg.share_prefix else None
        _engine_fault_hook(self.engine)
        shape = self.engine.cache.shape
        capacity = ((shape.num_blocks - 1) * shape.block_size  # one sequence alone, minus the scratch block
                    if self.engine.cache.has_global_layers else self.engine.max_context)
        prompt_limit = min(self.engine.max_prompt_tokens, capacity - cfg.sampling.max_new_tokens)
        if prompt_limit < 1:
            raise RuntimeError(f"the engine cache holds {capacity} tokens per sequence, not enough for "
                               f"task.max_new_tokens={cfg.sampling.max_new_tokens}; raise model.cache_budget_mb")
        t_engine = time.perf_counter()
        self.codec = load_codec(folder)
        if cfg.prompt.chat and not self.codec.has_chat_template:
            raise RuntimeError(f"task.chat is true but {cfg.model_path} has no chat template")
        self.device, self.dtype = device, dtype_name
        self.runner = UnitRunner(cfg.prompt, cfg.output, cfg.sampling, self.codec,
                                 prompt_limit, self._generate, before_write=_crash_hook,
                                 generate_stats=self._generate_stats, enrich=cfg.enrich,
                                 vocab_size=self.model.config.vocab_size)
        import ray

        ctx = ray.get_runtime_context()
        self.identity = {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id() or "",
                         "pid": str(os.getpid()), "device": device}
        self.metrics = ActorMetrics(cfg.job_id, actor_label(self.identity["actor_id"]), self.engine.snapshot)
        # where this actor's start went (its share of the job's start_s; Ray's own worker start
        # and the unpickling of this class come before and are not in it)
        self.start_split = {"import_s": t_import - t0,
                            "resolve_s": t_resolve - t_import,  # the checkpoint's folder, the kernel cache
                            "load_s": t_load - t_resolve, "engine_s": t_engine - t_load,
                            "tokenizer_s": time.perf_counter() - t_engine}

    def _generate(self, prompts: list[list[int]], seeds: list[int],
                  options: list[RequestOptions] | None = None) -> list[Generation]:
        n = max(1, self.cfg.sampling.n)
        opts = options if options is not None else [RequestOptions()] * len(seeds)
        params = request_params(self.cfg.sampling, [sample_seed(seed, j) for seed in seeds for j in range(n)],
                                [o for o in opts for _ in range(n)], self.codec.eos_token_id)
        held, rest = self.prefix.split(prompts) if self.prefix else (None, prompts)
        job_pid = held.pid if held else None
        row_pids: list[int] = []
        try:
            # A prompt asked for more than once (the n samples of a row; a row's classify labels,
            # each forced after the same prompt) is computed once, all but its last token, and its
            # requests fork from it.
            expanded = [r for r in rest for _ in range(n)]
            counts = Counter(tuple(r) for r in expanded)
            reqs, pids = [], []
            row_pid: dict[tuple[int, ...], int] = {}
            for r in expanded:
                key = tuple(r)
                if counts[key] > 1 and len(r) > 1:
                    if key not in row_pid:
                        row_pid[key] = self.frontend.add_prefix(r[:-1], job_pid)
                        row_pids.append(row_pid[key])
                    reqs.append(r[-1:])
                    pids.append(row_pid[key])
                else:
                    reqs.append(r)
                    pids.append(job_pid)
            outs = self.frontend.generate(reqs, params, pids, release=tuple(row_pids))
        except Exception as e:
            if self.frontend.error is not None:
                # The engine itself failed (a CUDA error poisons the process's context): exit so
                # Ray restarts this actor with a fresh model; the pool retries its units.
                print(f"hymba-batch actor {os.getpid()}: engine failed ({e!r}); exiting for a restart",
                      file=sys.stderr, flush=True)
                os._exit(ENGINE_FAILED_EXIT)
            raise
        finally:
            if self.prefix:
                self.prefix.done(held)
        gens = generations(outs)
        if n == 1:
            return gens
        rows = [gens[i:i + n] for i in range(0, len(gens), n)]
        return [Generation(g[0].token_ids, g[0].finish_reason, g[0].prompt_tokens,
                           next((x.error for x in g if x.error), None), logprobs=g[0].logprobs,
                           samples=[x.token_ids for x in g]) for g in rows]

    def _generate_stats(self) -> dict[str, float]:
        """Engine counters when a unit's generation ended (cumulative for this engine)."""
        return {"engine_preemptions": float(self.engine.scheduler.num_preemptions),
                "engine_forked_tokens": float(self.engine.scheduler.forked_tokens)}

    def info(self) -> dict[str, str]:
        """Where this actor runs (node, pid, device) and its engine's sequence slots."""
        return dict(self.identity, dtype=self.dtype, max_prompt_tokens=str(self.engine.max_prompt_tokens),
                    slots=str(self.engine.cache.shape.num_slots - 1),
                    **{f"start_{k}": f"{v:.3f}" for k, v in self.start_split.items()})

    def process(self, unit: WorkUnit) -> UnitResult:
        """Run one unit; the output file is committed when this returns."""
        _poison_hook(unit)
        busy_dir = os.environ.get(BUSY_DIR_ENV)
        if not busy_dir:
            return self._counted(self.runner.run(unit, worker=self.identity))
        marker = os.path.join(busy_dir, f"busy-{self.identity['node_id']}")
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        try:
            return self._counted(self.runner.run(unit, worker=self.identity))
        finally:
            os.remove(marker)

    def _counted(self, res: UnitResult) -> UnitResult:
        """Publish a unit this actor committed (not one an earlier try had committed)."""
        if not res.reused:
            self.metrics.unit_done(res.rows, res.prompt_tokens, res.completion_tokens, res.error_rows)
            self.metrics.poll()  # the engine's counters as of this unit's end
        return res
