"""Loading a checkpoint of the real Hymba-1.5B config (random weights, bf16, ~3 GB) in a process
whose CUDA is already up: our ``load_model`` (twice) beside safetensors' own ``load_file`` to the
GPU and to the CPU then ``.to("cuda")``, and a plain read of the file's bytes; then ``load_model``
twice in each of two fresh processes (straight to the GPU; to the CPU, then moved), as an actor
meets it. Separates the cold start's loading from CUDA's own start (``pipeline_scale.py
--cold-start`` times that).

    python -m hymba_batch.jobs.bench.load --json-out $OUT/load.json   # on the GPU machine

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from hymba_batch.model import load_model
from hymba_batch.model.checkpoints import write_checkpoint
from hymba_batch.model.config import HymbaConfig, real_config_dict


FRESH = """
import json, sys, time
import torch
t = time.perf_counter()
torch.empty(1, device="cuda")
torch.cuda.synchronize()
out = {"cuda_init_s": time.perf_counter() - t}
from hymba_batch.model import load_model
for i in range(2):  # the first load in a fresh process, then a second in the same process
    t = time.perf_counter()
    if sys.argv[2] == "cuda":
        m = load_model(sys.argv[1], device="cuda", dtype=torch.bfloat16)
    else:
        m = load_model(sys.argv[1], device="cpu", dtype=torch.bfloat16).to("cuda")
    torch.cuda.synchronize()
    out[f"load_model_s_{i}"] = time.perf_counter() - t
    del m
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/hymba-load")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    from safetensors.torch import load_file

    torch.empty(1, device="cuda")  # CUDA up before anything is timed
    ckpt = Path(a.workdir)
    t = time.perf_counter()
    write_checkpoint(ckpt, HymbaConfig.from_dict(real_config_dict()), seed=0, dtype=torch.bfloat16)
    res: dict = {"write_s": time.perf_counter() - t}
    path = ckpt / "model.safetensors"
    t = time.perf_counter()
    res["bytes"] = len(path.read_bytes())
    res["read_bytes_s"] = time.perf_counter() - t
    for i in range(2):
        t = time.perf_counter()
        model = load_model(ckpt, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        res[f"load_model_s_{i}"] = time.perf_counter() - t
        del model
    t = time.perf_counter()
    tensors = load_file(str(path), device="cuda:0")
    torch.cuda.synchronize()
    res["load_file_cuda_s"] = time.perf_counter() - t
    del tensors
    t = time.perf_counter()
    tensors = load_file(str(path), device="cpu")
    res["load_file_cpu_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tensors = {k: v.to("cuda") for k, v in tensors.items()}
    torch.cuda.synchronize()
    res["cpu_to_cuda_s"] = time.perf_counter() - t
    del tensors
    # the same in fresh processes, as an actor meets it: the cold start's "load" took 6.7-7.9 s
    # where this process takes 0.6-0.7 s (pipeline-cold-start-h200-2026-12-05.json)
    for how in ("cuda", "cpu_then_cuda"):
        p = subprocess.run([sys.executable, "-c", FRESH, str(ckpt), how], capture_output=True, text=True)
        res[f"fresh_{how}"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 \
            else {"error": p.stderr[-2000:]}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
