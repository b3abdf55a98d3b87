"""Enrichment benchmarks (issue #14): what a JSON-schema constraint costs the engine's decode,
and classify's rows/s.

    python -m hymba_batch.jobs.bench.enrich --json-out $OUT/enrich.json   # on the GPU machine
    python -m hymba_batch.jobs.bench.enrich --tiny                         # CPU smoke run

Constraint cost, on the G shape (prompts of 128 random tokens, up to 512 new, temperature 1):
each schema's constrained run is timed, then the same prompts unconstrained with each request's
``max_new_tokens`` set to the length its constrained twin produced (EOS ignored), so both runs
generate exactly the same number of tokens per request. Two schemas: ``records`` (20 objects of
an enum, a bounded integer, a boolean and a short string: the mask changes state at every token)
and ``text`` (one long string: the mask is nearly the whole vocabulary). Target: <= 10% slower.

Classify: rows of 128 random tokens scored against 4 labels (one forced-decoding request per
row and label), rows/s; beside it, the same rows with one plain greedy token each (a prefill of
each row once), to show what scoring 4 continuations costs over one prefill.

Random weights of the real Hymba-1.5B config in bf16 (tiny config in fp32 with --tiny); a
warm-up first; prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hymba_batch.model.checkpoints import random_model, tiny_config
from hymba_batch.model.config import HymbaConfig, real_config_dict
from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams
from hymba_batch.pipeline.classify import ForcedTokens, label_probs
from hymba_batch.pipeline.enrich import label_tokens
from hymba_batch.pipeline.grammar import JsonGrammar
from hymba_batch.pipeline.tokenizer import load_codec

TOKENIZER = Path(__file__).resolve().parents[2] / "model" / "assets" / "tokenizer"
LABELS = ["politics", "sports", "business", "science"]


def schemas(items: int) -> dict[str, dict]:
    record = {"type": "object", "properties": {
        "kind": {"enum": ["person", "place", "organisation", "event"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 24}}, "required": ["kind", "score", "ok", "name"]}
    return {
        "records": {"type": "object", "properties": {"records": {"type": "array", "items": record,
                                                                  "minItems": items, "maxItems": items}},
                    "required": ["records"]},
        "text": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100_000}},
                 "required": ["text"]},
    }


def prompts_for(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (n, length), generator=g)
    ids[:, 0] = 1
    return ids.tolist()


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(engine: Engine, prompts, params, dev: str):
    _sync(dev)
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync(dev)
    return outs, time.perf_counter() - t


def constraint_cost(engine: Engine, grammar: JsonGrammar, prompts, new: int, dev: str) -> dict:
    con = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, constraint=grammar.constraint())
           for i in range(len(prompts))]
    host = engine.logits_processor.stats
    host.update(constraint_fill_s=0.0, constraint_advance_s=0.0)
    outs, t_con = timed(engine, prompts, con, dev)
    fill_s, advance_s = host["constraint_fill_s"], host["constraint_advance_s"]
    lens = [len(o.token_ids) for o in outs]
    unc = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=i, ignore_eos=True) for i, n in enumerate(lens)]
    outs_u, t_unc = timed(engine, prompts, unc, dev)
    assert [len(o.token_ids) for o in outs_u] == lens
    tokens = sum(lens)
    return {"requests": len(prompts), "gen_tokens": tokens, "mean_len": tokens / len(prompts),
            "closed": sum(o.finish_reason == "stop" for o in outs), "errors": sum(o.error is not None for o in outs),
            "constrained_s": t_con, "unconstrained_s": t_unc,
            "constrained_gen_tok_per_s": tokens / t_con, "unconstrained_gen_tok_per_s": tokens / t_unc,
            "slowdown": t_con / t_unc - 1,
            "host_mask_fill_s": fill_s, "host_advance_s": advance_s}  # host time inside the constrained run


def classify_rate(engine: Engine, codec, prompts, dev: str) -> dict:
    label_ids = [label_tokens(codec, x, chat=True) for x in LABELS]
    reqs, params = [], []
    for p in prompts:
        for ids in label_ids:
            reqs.append(p)
            params.append(SamplingParams(max_new_tokens=len(ids), logprobs=True, constraint=ForcedTokens(ids)))
    outs, t = timed(engine, reqs, params, dev)
    L = len(LABELS)
    probs = [label_probs([sum(o.logprobs or []) for o in outs[i * L:(i + 1) * L]]) for i in range(len(prompts))]
    assert all(abs(sum(p) - 1) < 1e-9 for p in probs)
    _, t_one = timed(engine, prompts, SamplingParams(max_new_tokens=1), dev)
    return {"rows": len(prompts), "labels": L, "label_tokens": [len(x) for x in label_ids],
            "seconds": t, "rows_per_s": len(prompts) / t, "one_token_rows_per_s": len(prompts) / t_one,
            "cost_vs_one_prefill": t / t_one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few rows")
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--items", type=int, default=20, help="objects in the records schema")
    ap.add_argument("--classify-rows", type=int, default=2048)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    if a.tiny:
        a.prompts, a.prompt_tokens, a.new_tokens, a.items, a.classify_rows = 8, 16, 48, 2, 8
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if dev == "cpu":
        torch.set_num_threads(1)  # shared CPUs: one intra-op thread avoids OpenMP oversubscription
    cfg = tiny_config() if a.tiny else HymbaConfig.from_dict(real_config_dict())
    model = random_model(cfg, dev, torch.float32 if dev == "cpu" else torch.bfloat16)
    engine = Engine(model, EngineConfig(**({} if a.max_batch_tokens is None else {"max_batch_tokens": a.max_batch_tokens})))
    codec = load_codec(TOKENIZER)
    result: dict = {"bench": "enrich", "hardware": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                    "model": "random weights, " + ("tiny config, fp32" if a.tiny else "real Hymba-1.5B config, bf16"),
                    "settings": vars(a)}
    t0 = time.perf_counter()
    grammars = {name: JsonGrammar(s, codec.hf, cfg.vocab_size) for name, s in schemas(a.items).items()}
    result["grammar_compile_s"] = time.perf_counter() - t0
    warm = prompts_for(min(64, a.prompts), a.prompt_tokens, seed=9)
    engine.generate(warm, SamplingParams(max_new_tokens=16, ignore_eos=True))
    constraint_cost(engine, grammars["records"], warm, 16, dev)
    rows = []
    prompts = prompts_for(a.prompts, a.prompt_tokens, seed=2)
    for name, g in grammars.items():
        r = constraint_cost(engine, g, prompts, a.new_tokens, dev)
        result[f"constraint_{name}"] = r
        rows.append((f"G + {name} schema", f"{r['mean_len']:.0f} tok/row", f"{r['constrained_gen_tok_per_s']:.0f} vs "
                     f"{r['unconstrained_gen_tok_per_s']:.0f} gen tok/s", f"{100 * r['slowdown']:+.1f}% (target <= +10%)",
                     f"{r['closed']}/{r['requests']} closed",
                     f"host: fill {r['host_mask_fill_s']:.2f} s, advance {r['host_advance_s']:.2f} s"))
        print(*rows[-1], sep=" | ", flush=True)
    r = classify_rate(engine, codec, prompts_for(a.classify_rows, a.prompt_tokens, seed=3), dev)
    result["classify"] = r
    rows.append(("classify, 4 labels", f"{r['rows_per_s']:.1f} rows/s", f"one-token generation: {r['one_token_rows_per_s']:.1f} rows/s",
                 f"x{r['cost_vs_one_prefill']:.2f} its time"))
    print(*rows[-1], sep=" | ", flush=True)
    print("\n".join(" | ".join(x) for x in rows))
    if a.json_out:
        os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
        with open(a.json_out, "w") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
