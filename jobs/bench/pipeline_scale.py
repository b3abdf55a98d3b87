"""Pipeline scale check: a summarize job over many rows of real text with the real-size config,
end to end through Ray, with 1 and 2 GPUs and 1, 2, 4 actors per GPU, against the engine alone on
the same prompts; and a fresh process's start to its first batch, with an empty and a warm
kernel cache.

    python -m hymba_batch.jobs.bench.pipeline_scale --rows 5000 --gpus 1 --actors-per-gpu 1,2 \
        --json-out $OUT/pipeline_scale.json
    python -m hymba_batch.jobs.bench.pipeline_scale --tiny     # CPU smoke run of this script

Input (``--text pydoc``, the default): real English prose shipped with every CPython, the Python
reference manual's topics (``pydoc_data.topics``, ~65k words in ~1,900 paragraphs). Each row is a
run of consecutive paragraphs from a seeded random start, its length in words log-normal (median
``--words``, sigma 0.9, clipped to [20, 6000]), so prompts vary as real articles do; rows reuse the
text. ``--text words`` gives the old uniform synthetic rows.

Prints a table, then one JSON line last. Targets: end to end >= 0.9x engine-only; 2 GPUs >= 1.9x one;
a cold start to the first batch <= 10 s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import JobSpec
from hymba_batch.model import HymbaConfig, load_model
from hymba_batch.model.checkpoints import tiny_config, write_checkpoint
from hymba_batch.model.config import real_config_dict
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
from hymba_batch.pipeline.prompts import PromptBuilder, PromptConfig
from hymba_batch.pipeline.tokenizer import load_codec

WORDS = ("council river market festival library budget school harbor train bridge museum garden "
         "weather election park science report city night music street village ocean mountain").split()


def real_texts(rows: int, median_words: int, seed: int = 0) -> list[str]:
    """Rows of real prose of log-normal length (see the module docstring)."""
    import math

    from pydoc_data.topics import topics

    paras = [" ".join(p.split()) for t in topics.values() for p in t.split("\n\n") if len(p.split()) > 5]
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        want = int(min(6000, max(20, math.exp(math.log(median_words) + 0.9 * rng.gauss(0, 1)))))
        i, words = rng.randrange(len(paras)), []
        while len(words) < want:
            words += paras[i % len(paras)].split()
            i += 1
        out.append(" ".join(words[:want]))
    return out


def write_input(folder: Path, rows: int, words: int, text: str = "pydoc", files: int = 8) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    texts = real_texts(rows, words) if text == "pydoc" else \
        [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(rows)]
    per = -(-rows // files)
    for f in range(files):
        ids = list(range(f * per, min(rows, (f + 1) * per)))
        pq.write_table(pa.table({"id": ids, "text": [texts[i] for i in ids]}), folder / f"part-{f:03d}.parquet",
                       row_group_size=512)


COLD_START = """
import json, sys, threading, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
cuda = threading.Thread(target=lambda: torch.empty(1, device="cuda"))
if sys.argv[2] == "thread":  # CUDA's start in a thread while the rest imports: does it overlap?
    cuda.start()
from hymba_batch.model import load_model
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
t_engine = time.perf_counter()
from hymba_batch.pipeline.tokenizer import load_codec
codec = load_codec(sys.argv[1])
t1 = time.perf_counter()
if sys.argv[2] != "thread":
    cuda.start()
cuda.join()
t_cuda = time.perf_counter()
model = load_model(sys.argv[1], device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t2 = time.perf_counter()
engine = Engine(model, EngineConfig(memory_fraction=0.45))
t3 = time.perf_counter()
engine.generate([[1] + list(range(100, 900))] * 8 + [[1] + list(range(5, 300))] * 8,
                SamplingParams(max_new_tokens=4, ignore_eos=True))
torch.cuda.synchronize()
t4 = time.perf_counter()
print(json.dumps({"import_torch_s": t_torch - t0, "import_engine_s": t_engine - t_torch,
                  "import_tokenizer_s": t1 - t_engine, "import_s": t1 - t0, "cuda_init_s": t_cuda - t1,
                  "load_s": t2 - t_cuda, "engine_init_s": t3 - t2, "first_batch_s": t4 - t3, "total_s": t4 - t0}))
"""


def cold_start(ckpt: Path, work: Path) -> dict:
    """A fresh process to its first batch (16 prompts, 4 new tokens, after importing the engine and
    the tokenizer and loading it): with an empty Triton cache (a new node); with a cache that
    ``hymba_batch.model.precompile`` filled with CUDA hidden (the image's precompiled kernels,
    ``precompile_s`` its time); with the cache the runs before filled (a warm node); that again
    with CUDA's start in a thread beside the imports (``cuda_init_s`` is then what is left of it)."""
    import subprocess
    import sys

    res = {}
    for which in ("empty_cache", "precompiled_cache", "warm_cache", "warm_cache_cuda_thread"):
        # the warm runs reuse the cache the empty run filled; the precompiled one has its own
        cache = work / ("triton-precompiled" if which == "precompiled_cache" else "triton-cache")
        env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
        extra = {}
        if which in ("empty_cache", "precompiled_cache"):  # these start empty
            shutil.rmtree(cache, ignore_errors=True)
        if which == "precompiled_cache":
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "hymba_batch.model.precompile"], capture_output=True, text=True,
                               env=env | {"CUDA_VISIBLE_DEVICES": ""})
            extra = {"precompile_s": time.perf_counter() - t}
            if p.returncode != 0:
                res[which] = {"error": p.stderr[-2000:]}
                continue
            extra["precompiled_variants"] = json.loads(p.stdout.strip().splitlines()[-1])["variants"]
        before = len(list(cache.glob("*/*.cubin")))
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", COLD_START, str(ckpt), "thread" if "thread" in which else "serial"],
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            res[which] = {"error": p.stderr[-2000:]}
            continue
        # kernel variants the process compiled itself (for the precompiled cache: what it missed)
        extra["compiled_in_process"] = len(list(cache.glob("*/*.cubin"))) - before
        res[which] = json.loads(p.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t} | extra
    return res


def job(ckpt: Path, inp: Path, out: Path, a, gpus: int | None, k: int, device: str) -> dict:
    return {
        "name": "scale",
        "model": {"path": str(ckpt), "device": device},
        "input": {"uri": str(inp), "text_column": "text", "id_column": "id", "rows_per_unit": a.rows_per_unit},
        "task": {"kind": "summarize", "chat": False, "max_new_tokens": a.new_tokens,
                 "max_input_tokens": a.prompt_tokens, "truncation": "tail"},
        "output": {"uri": str(out), "format": "parquet", "mode": "results"},
        "resources": {"num_gpus": gpus, "actors_per_gpu": k, "max_in_flight": a.in_flight,
                      **({"num_actors": k} if device == "cpu" else {})},
    }


def engine_only(ckpt: Path, inp: Path, a, device: str) -> dict:
    """The same prompts through one engine, no Ray, no I/O in the timed part."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_load = time.perf_counter()
    model = load_model(ckpt, device=device, dtype=dtype)
    engine = Engine(model, EngineConfig())
    codec = load_codec(ckpt)
    builder = PromptBuilder(PromptConfig(kind="summarize", chat=False, max_input_tokens=a.prompt_tokens,
                                         truncation="tail"), codec, engine.max_prompt_tokens)
    rows = pq.read_table(inp).to_pylist()
    prompts = [p.token_ids for p in builder.build_batch(rows)]
    assert all(p is not None for p in prompts), "every synthetic row must make a prompt"
    params = SamplingParams(max_new_tokens=a.new_tokens, stop_token_ids=(codec.eos_token_id,))
    engine.generate(prompts[:8], params)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    load_s = t - t_load
    outs = engine.generate(prompts, params)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del engine, model
    gc.collect()  # the engine's CUDA graphs and caches sit in reference cycles: free them for the actors
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"rows": len(rows), "seconds": dt, "rows_per_s": len(rows) / dt, "load_s": load_s,
            "rows_per_s_with_load": len(rows) / (dt + load_s),
            "prompt_tokens": sum(o.prompt_tokens for o in outs),
            "completion_tokens": sum(o.completion_tokens for o in outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--words", type=int, default=420, help="median words per article (pydoc) or words per row (words)")
    ap.add_argument("--text", choices=("pydoc", "words"), default="pydoc")
    ap.add_argument("--cold-start", action="store_true", help="also time a fresh process to its first batch (GPU)")
    ap.add_argument("--prompt-tokens", type=int, default=2048, help="task.max_input_tokens (longer rows truncated)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rows-per-unit", type=int, default=1024)
    ap.add_argument("--in-flight", type=int, default=None, help="resources.max_in_flight (default: auto)")
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--actors-per-gpu", default="1,2,4")
    ap.add_argument("--workdir", default="/tmp/hymba-scale")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few rows")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if a.tiny:
        a.rows, a.words, a.prompt_tokens, a.new_tokens, a.rows_per_unit = 96, 30, 64, 4, 16
        a.gpus, a.actors_per_gpu = "0", "1,2"
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = tiny_config() if a.tiny else HymbaConfig.from_dict(real_config_dict())
    ckpt = write_checkpoint(work / "ckpt", cfg, seed=0, dtype=torch.float32 if a.tiny else torch.bfloat16)
    write_input(work / "input", a.rows, a.words, a.text)
    result: dict = {"bench": "pipeline_scale", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "settings": vars(a)}
    def dump() -> None:  # after every run: a killed command still leaves what it measured
        if a.json_out:
            os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
            Path(a.json_out).write_text(json.dumps(result) + "\n")

    if a.cold_start and device == "cuda":
        result["cold_start"] = cs = cold_start(ckpt, work)
        dump()
        for which, r in cs.items():
            print(f"cold start, {which}", *(f"{k} {v:.1f}" for k, v in r.items() if isinstance(v, float)),
                  sep=" | ", flush=True)
    result["engine_only"] = base = engine_only(ckpt, work / "input", a, device)
    dump()
    rows_table = [("engine only", f"{base['rows_per_s']:.1f} rows/s warm",
                   f"{base['rows_per_s_with_load']:.1f} rows/s counting its {base['load_s']:.0f} s load")]
    print(*rows_table[-1], sep=" | ", flush=True)
    ray.init(include_dashboard=False)  # once, so that no run's time includes starting Ray
    runs = []
    for g in (int(x) for x in a.gpus.split(",")):
        if device == "cuda" and g > torch.cuda.device_count():
            runs.append({"gpus": g, "skipped": f"only {torch.cuda.device_count()} GPU(s) visible"})
            continue
        for k in (int(x) for x in a.actors_per_gpu.split(",")):
            out = work / f"out-g{g}-k{k}"
            spec = JobSpec.model_validate(job(ckpt, work / "input", out, a, g if device == "cuda" else None, k, device))
            t = time.perf_counter()
            summary = run_job(spec)
            dt = time.perf_counter() - t
            assert summary.state == "succeeded" and summary.committed_rows == a.rows, summary
            r = {"gpus": g, "actors_per_gpu": k, "seconds": dt, "rows_per_s": a.rows / dt,
                 "vs_engine_only": (a.rows / dt) / base["rows_per_s"],
                 "vs_engine_only_with_load": (a.rows / dt) / base["rows_per_s_with_load"],
                 "completion_tokens": summary.completion_tokens, "prompt_tokens": summary.prompt_tokens,
                 "time_split": summary.time_split,
                 "actor_start": [{k: v for k, v in i.items() if k.startswith("start_")} for i in summary.actors]}
            runs.append(r)
            result["runs"] = runs
            dump()
            rows_table.append((f"{g} GPU x {k} actors", f"{r['rows_per_s']:.1f} rows/s (whole job, actor start incl.)",
                               f"x{r['vs_engine_only']:.2f} engine-only warm, "
                               f"x{r['vs_engine_only_with_load']:.2f} with its load",
                               " ".join(f"{k2} {v:.1f}" for k2, v in summary.time_split.items())))
            print(*rows_table[-1], sep=" | ", flush=True)
    result["runs"] = runs
    best = {}
    for r in runs:
        if "rows_per_s" in r:
            best[r["gpus"]] = max(best.get(r["gpus"], 0.0), r["rows_per_s"])
    if 1 in best and 2 in best:
        result["two_gpu_speedup"] = best[2] / best[1]
    print("\n".join(" | ".join(r) for r in rows_table))
    dump()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
