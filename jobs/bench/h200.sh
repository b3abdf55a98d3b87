#!/usr/bin/env bash
# The H200 session's benchmark commands, as run through the device tool (one GPU, bf16, random
# weights of the real config). Results land in $OUT and are committed under jobs/bench/results/.
#   bash jobs/bench/h200.sh engine     GPU tests of the engine and kernels, the fused kernels against
#                                      the torch ops they replace, S, M, G, L and a step profile, then
#                                      loading the checkpoint in a warm and in fresh processes
#   bash jobs/bench/h200.sh scan       the prefill scan against the kernel it replaced, and its launch configs,
#                                      and the prefill conv's tiles (its default spills: 240 bytes, sm_90
#                                      static), at 16, 32 and 64 sequences of 1,024 tokens (32 is a default
#                                      prefill step's; about 3 minutes)
#   bash jobs/bench/h200.sh tune       M and S on engines with the scan kernel it replaced, other launch configs
#                                      and 65,536 prompt tokens per prefill step, same run (about 7 minutes)
#   bash jobs/bench/h200.sh prefill    M and S at 32,768 prompt tokens per prefill step (the engine's
#                                      default), 16,384 and 65,536, same run
#   bash jobs/bench/h200.sh baselines  S and G beside transformers generate (the cache that won before)
#   bash jobs/bench/h200.sh enrich     prefix sharing (engine), the JSON-schema constraint's cost on G,
#                                      classify rows/s
#   bash jobs/bench/h200.sh pipeline   the whole job vs the engine alone on 5,000 rows (ROWS=...) of real
#                                      prose, 1 and 2 actors per GPU (ACTORS=...)
#   bash jobs/bench/h200.sh coldstart  a fresh process to its first batch with an empty, a precompiled and
#                                      a warm kernel cache (and a 500-row job)
# Needs: .whl/ (`bash ../shared/device/wheels.sh llguidance pydantic pydantic-core annotated-types
# typing-inspection typing-extensions`: Ray, its missing dependencies and ours, ~50 MiB) for `enrich`,
# `pipeline` and `coldstart`, .devshared/ (a copy of ../shared/golden and ../shared/hymba-1.5b)
# for `engine`.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pkg/hymba_batch
for d in model pipeline workers jobs; do ln -sfn "$PWD/$d" "/tmp/pkg/hymba_batch/$d"; done
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HYMBA_SHARED=$PWD/.devshared
case "${1:-}" in
  engine)
    timeout 180 python3 -m pytest -m gpu -q -rf -p no:cacheprovider tests/model/engine tests/model/kernels/test_rope.py \
      tests/model/kernels/test_gate.py tests/model/kernels/test_rmsnorm.py tests/model/kernels/test_scan.py \
      2>&1 | tee "$OUT/gpu-tests.log" | tail -5
    timeout 90 python3 -m hymba_batch.jobs.bench.kernels --seqs 16 --seqlen 1024 --decode-B 2048 \
      --only rmsnorm_avg rope silu_mul gemm scan_varlen state_update > "$OUT/kernels.txt" 2>&1; tail -n +2 "$OUT/kernels.txt" | head -16
    tail -1 "$OUT/kernels.txt" > "$OUT/kernels.json"
    timeout 250 python3 -m hymba_batch.jobs.bench.engine --workloads S,M,G,L --repeats 1 \
      --profile "$OUT/profile.txt" --json-out "$OUT/engine.json" 2>&1 | grep -E "\||LOOP|WARNING"
    timeout 70 python3 -m hymba_batch.jobs.bench.load --json-out "$OUT/load.json" 2>&1 | tail -1
    ;;
  scan)  # which BLOCK_E / warps / unrolling each prefill step's shape wants
    for s in 16 32 64; do
      timeout 170 python3 -m hymba_batch.jobs.bench.kernels --seqs $s --seqlen 1024 --decode-B 1 --only scan_varlen conv1d_varlen \
        --sweep --no-ref > "$OUT/scan-sweep-$s.txt" 2>&1
      tail -1 "$OUT/scan-sweep-$s.txt" > "$OUT/scan-sweep-$s.json"; grep -E "^(scan_varlen|conv1d_varlen)" "$OUT/scan-sweep-$s.txt"
    done
    ;;
  tune)  # the scan kernel against the one it replaced; its launch rule (32 channels a warp) against 64, the plain loop and 16; a bigger prefill step
    timeout 580 python3 -m hymba_batch.jobs.bench.engine --workloads M,S --repeats 1 \
      --variants "scan_before=1;scan.BLOCK_E=64;scan.UNROLL4=0;scan.BLOCK_E=16;max_batch_tokens=65536" \
      --json-out "$OUT/engine-tune.json" 2>&1 | grep -E "\||WARNING"
    ;;
  prefill)  # tokens per prefill step around the engine's default
    timeout 400 python3 -m hymba_batch.jobs.bench.engine --workloads M,S --repeats 1 \
      --variants "max_batch_tokens=16384;max_batch_tokens=65536" --json-out "$OUT/engine-prefill-tokens.json" 2>&1 | grep "|"
    ;;
  baselines)  # the transformers baselines beside S and G (about 5 minutes)
    timeout 560 python3 -m hymba_batch.jobs.bench.engine --workloads S,G --repeats 1 --baselines \
      --hf-caches S=dynamic,G=static --json-out "$OUT/engine-baselines.json" 2>&1 | grep "|"
    ;;
  enrich)  # issue #14's figures: prefix sharing (engine), the constraint's cost, classify rows/s
    timeout 150 python3 -m hymba_batch.jobs.bench.prefix --rows 3072 --modes engine --json-out "$OUT/prefix.json" 2>&1 | tail -4
    timeout 300 python3 -m hymba_batch.jobs.bench.enrich --prompts 512 --classify-rows 512 \
      --json-out "$OUT/enrich.json" 2>&1 | tail -8
    ;;
  pipeline)  # about 300 s at 5,000 rows; ROWS=15000 about 560 s with ACTORS=1
    timeout 580 python3 -m hymba_batch.jobs.bench.pipeline_scale --rows ${ROWS:-5000} --gpus 1 \
      --actors-per-gpu ${ACTORS:-1,2} --json-out "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.log" | grep "|" \
      || tail -20 "$OUT/pipeline.log"
    ;;
  coldstart)  # fresh processes to a first batch: empty, precompiled and warm kernel caches (about 250 s)
    timeout 400 python3 -m hymba_batch.jobs.bench.pipeline_scale --rows 500 --gpus 1 --actors-per-gpu 1 \
      --cold-start --json-out "$OUT/cold-start.json" 2>&1 | tee "$OUT/cold-start.log" | grep "|" \
      || tail -20 "$OUT/cold-start.log"
    ;;
  *) echo "usage: $0 engine|scan|tune|prefill|baselines|enrich|pipeline|coldstart" >&2; exit 2 ;;
esac
