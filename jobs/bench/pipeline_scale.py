"""Pipeline scale check (issue #4 item 9): a summarize job over many rows with the real-size config,
end to end through Ray, with 1 and 2 GPUs and 1, 2, 4 actors per GPU, against the engine alone on
the same prompts.

    python -m hymba_batch.jobs.bench.pipeline_scale --rows 20000 --gpus 1,2 --actors-per-gpu 1,2,4 \
        --json-out $OUT/pipeline_scale.json
    python -m hymba_batch.jobs.bench.pipeline_scale --tiny     # CPU smoke run of this script

Prints a table, then one JSON line last. Targets: end to end >= 0.9x engine-only; 2 GPUs >= 1.9x one.
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


def write_input(folder: Path, rows: int, words: int, files: int = 8) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        ids = list(range(f * per, min(rows, (f + 1) * per)))
        texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in ids]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"part-{f:03d}.parquet", row_group_size=512)


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
    ap.add_argument("--words", type=int, default=900, help="words per synthetic article")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rows-per-unit", type=int, default=1024)
    ap.add_argument("--in-flight", type=int, default=3)
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
    write_input(work / "input", a.rows, a.words)
    result: dict = {"bench": "pipeline_scale", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "settings": vars(a)}
    def dump() -> None:  # after every run: a killed command still leaves what it measured
        if a.json_out:
            os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
            Path(a.json_out).write_text(json.dumps(result) + "\n")

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
                 "completion_tokens": summary.completion_tokens}
            runs.append(r)
            result["runs"] = runs
            dump()
            rows_table.append((f"{g} GPU x {k} actors", f"{r['rows_per_s']:.1f} rows/s (whole job, actor start incl.)",
                               f"x{r['vs_engine_only']:.2f} engine-only warm, "
                               f"x{r['vs_engine_only_with_load']:.2f} with its load"))
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
