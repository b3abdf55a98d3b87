"""Prefix sharing (issue 14 item 7): a template job whose rows all start with the same few-shot
prefix (>= 500 tokens) followed by a ~200-token row, greedy, with and without
``task.share_prefix``: rows/s of the engine alone on the same prompts and of the whole job
through Ray, and whether the outputs are equal. Target: >= 2x rows/s with sharing.

    python -m hymba_batch.jobs.bench.prefix --json-out $OUT/prefix.json     # GPU, real-size config
    python -m hymba_batch.jobs.bench.prefix --tiny                           # CPU smoke run

Prints a table, then one JSON line last.
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
import pyarrow.dataset as ds
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
from hymba_batch.workers.prefix import SharedPrefix, common_prefix_len

WORDS = ("council river market festival library budget school harbor train bridge museum garden "
         "weather election park science report city night music street village ocean mountain").split()
TOPICS = ("politics", "culture", "transport", "nature", "economy", "science")


def few_shot_template(shots: int, words: int) -> str:
    rng = random.Random(1)
    lines = ["You are a careful news editor. Read each text and answer with its topic in one word.\n"]
    for _ in range(shots):
        lines.append(f"Text: {' '.join(rng.choice(WORDS) for _ in range(words))}\nTopic: {rng.choice(TOPICS)}\n")
    return "\n".join(lines) + "\nText: {{ text }}\nTopic:"


def write_input(folder: Path, rows: int, words: int, files: int = 8) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        ids = list(range(f * per, min(rows, (f + 1) * per)))
        texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in ids]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"part-{f:03d}.parquet", row_group_size=512)


def prompt_config(a) -> PromptConfig:
    return PromptConfig(kind="template", text_column="text", template=a.template, chat=False)


def engine_only(ckpt: Path, inp: Path, a, device: str) -> dict:
    """The job's prompts through one engine (no Ray, no I/O timed): whole prompts, then the same
    prompts forked from their common prefix (its prefill counted)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(ckpt, device=device, dtype=dtype)
    engine = Engine(model, EngineConfig())
    codec = load_codec(ckpt)
    rows = ds.dataset(str(inp), format="parquet").to_table().to_pylist()
    prompts = [p.token_ids for p in PromptBuilder(prompt_config(a), codec, engine.max_prompt_tokens).build_batch(rows)]
    assert all(p is not None for p in prompts)
    shared = common_prefix_len(prompts)
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    out: dict = {"rows": len(prompts), "shared_prefix_tokens": shared,
                 "row_tokens_mean": sum(len(p) for p in prompts) / len(prompts) - shared}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def unshared(ps):
        return [o.token_ids for o in engine.generate(ps, params)]

    def with_prefix(ps):
        sp = SharedPrefix(engine, min_tokens=16)
        held, rest = sp.split(ps)
        res = [o.token_ids for o in engine.generate(rest, params, prefix=held.pid)]
        sp.done(held)
        sp.close()  # free its slot: the next run starts clean
        return res

    warm_decode_graphs(engine)  # every batch bucket captured before timing, so neither run pays for it
    results = {}
    for name, fn in (("unshared", unshared), ("shared", with_prefix)):
        fn(prompts[:16])  # warm-up (kernels, CUDA graphs)
        sync()
        t = time.perf_counter()
        results[name] = fn(prompts)
        sync()
        dt = time.perf_counter() - t
        out[name] = {"seconds": dt, "rows_per_s": len(prompts) / dt}
    out["speedup"] = out["shared"]["rows_per_s"] / out["unshared"]["rows_per_s"]
    out["outputs_equal_fraction"] = sum(x == y for x, y in zip(results["shared"], results["unshared"])) / len(prompts)
    del engine, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def warm_decode_graphs(engine: Engine) -> None:
    """Capture the decode CUDA graph of every batch bucket (on the scratch slot only)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return
    dev = engine.model.device
    sizes = sorted({graphs.bucket(b) for b in range(1, graphs.max_batch + 1)})
    for b in sizes:
        slot = torch.full((b,), engine.cache.scratch_slot, dtype=torch.long, device=dev)
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        graphs.run(slot, zeros, zeros)


def job(ckpt: Path, inp: Path, out: Path, a, share: bool, device: str) -> dict:
    return {
        "name": "prefix",
        "model": {"path": str(ckpt), "device": device},
        "input": {"uri": str(inp), "text_column": "text", "id_column": "id", "rows_per_unit": a.rows_per_unit},
        "task": {"kind": "template", "template": a.template, "chat": False, "max_new_tokens": a.new_tokens,
                 "share_prefix": share},
        "output": {"uri": str(out), "format": "parquet", "mode": "results"},
        "resources": {"max_in_flight": a.in_flight, **({"num_actors": 1} if device == "cpu" else {"num_gpus": 1})},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=6144)
    ap.add_argument("--row-words", type=int, default=180, help="words per row (~200 tokens)")
    ap.add_argument("--shots", type=int, default=12, help="few-shot examples in the shared prefix")
    ap.add_argument("--shot-words", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rows-per-unit", type=int, default=1024)
    ap.add_argument("--in-flight", type=int, default=3)
    ap.add_argument("--modes", default="engine,job", help="engine (no Ray), job (whole job through Ray), or both")
    ap.add_argument("--workdir", default="/tmp/hymba-prefix")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few rows")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if a.tiny:
        a.rows, a.row_words, a.shots, a.new_tokens, a.rows_per_unit, a.in_flight = 24, 30, 4, 4, 8, 2
    a.template = few_shot_template(a.shots, a.shot_words)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = tiny_config() if a.tiny else HymbaConfig.from_dict(real_config_dict())
    ckpt = write_checkpoint(work / "ckpt", cfg, seed=0, dtype=torch.float32 if a.tiny else torch.bfloat16)
    write_input(work / "input", a.rows, a.row_words)
    result: dict = {"bench": "prefix", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "python": platform.python_version(),
                    "settings": {k: v for k, v in vars(a).items() if k != "template"}}

    def dump() -> None:
        if a.json_out:
            os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
            Path(a.json_out).write_text(json.dumps(result) + "\n")

    table = []
    modes = set(a.modes.split(","))
    if "engine" in modes:
        e = result["engine_only"] = engine_only(ckpt, work / "input", a, device)
        dump()
        table.append(f"engine only: prefix {e['shared_prefix_tokens']} tokens, rows {e['row_tokens_mean']:.0f} "
                     f"tokens | unshared {e['unshared']['rows_per_s']:.1f} rows/s | shared "
                     f"{e['shared']['rows_per_s']:.1f} rows/s | x{e['speedup']:.2f} | outputs equal "
                     f"{e['outputs_equal_fraction']:.1%}")
        print(table[-1], flush=True)
    if "job" in modes:
        ray.init(include_dashboard=False)
        runs, texts = {}, {}
        for share in (False, True):
            out = work / f"out-share-{share}"
            spec = JobSpec.model_validate(job(ckpt, work / "input", out, a, share, device))
            t = time.perf_counter()
            summary = run_job(spec)
            dt = time.perf_counter() - t
            assert summary.state == "succeeded" and summary.committed_rows == a.rows, summary
            runs[share] = {"seconds": dt, "rows_per_s": a.rows / dt}
            tab = ds.dataset(str(out), format="parquet").to_table(columns=["id", "generated_text"])
            texts[share] = dict(zip(tab.column("id").to_pylist(), tab.column("generated_text").to_pylist()))
        j = result["job"] = {"unshared": runs[False], "shared": runs[True],
                             "speedup": runs[True]["rows_per_s"] / runs[False]["rows_per_s"],
                             "outputs_equal_fraction": sum(texts[True][k] == v for k, v in texts[False].items())
                             / a.rows}
        dump()
        table.append(f"whole job (1 actor, load incl.) | unshared {j['unshared']['rows_per_s']:.1f} rows/s | shared "
                     f"{j['shared']['rows_per_s']:.1f} rows/s | x{j['speedup']:.2f} | outputs equal "
                     f"{j['outputs_equal_fraction']:.1%}")
        print(table[-1], flush=True)
    print("\n".join(table))
    dump()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
