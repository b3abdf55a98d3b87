"""Static sm_90 analysis of the prefill scan kernel, on a machine with no GPU: each launch config
compiled by Triton for the target (the launch signature recorded from the engine, as
``model/precompile.py`` does), then the registers and stack ``cuobjdump`` reports and the
instruction mix of the kernel's main loop (the longest backward branch in ``nvdisasm``'s SASS):
local loads and stores (spills), shared-memory traffic and barriers (layout conversions), MUFU,
FFMA, FMUL (the unrolled loop holds four steps, the plain one one). ``--before`` also compiles
``scan_before.py`` (the kernel as last timed).

Registers decide warps an SM (65,536 registers an SM, allocated per warp in steps of 256), which
bounds how much latency the loop can hide; instructions per step bound its issue rate. These are
counts, not times: ``jobs/bench/h200.sh scan`` times the same configs.

    python -m hymba_batch.jobs.bench.scan_static [--arch 90] [--before] [--json-out F]

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

OPS = ("LDL", "STL", "LDS", "STS", "STSM", "BAR", "LDG", "MUFU", "FFMA", "FMUL")
_ADDR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/")


def loop_mix(sass: str) -> tuple[int, Counter]:
    """Instructions and opcode counts of the longest loop (a backward branch to a label)."""
    lines = sass.splitlines()
    labels, pending = {}, None
    for line in lines:
        if m := re.match(r"\.L_x_(\d+):", line.strip()):
            pending = m.group(1)
        elif (m := _ADDR.match(line)) and pending is not None:
            labels.setdefault(pending, int(m.group(1), 16))
            pending = None
    code = [(int(m.group(1), 16), line) for line in lines if (m := _ADDR.match(line))]
    loops = [(labels[m.group(1)], at) for at, line in code
             if (m := re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.L_x_(\d+)", line)) and labels.get(m.group(1), at + 1) < at]
    if not loops:
        return 0, Counter()
    lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])
    body = [line for at, line in code if lo <= at <= hi]
    ops = Counter(m.group(1).split(".")[0] for line in body
                  if (m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)))
    return len(body), ops


def analyse(launch: tuple, overrides: dict, num_warps: int, arch: int, work: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts, attrs, options = launch
    names = fn.arg_names
    consts = {k: overrides.get(names[k[0]], v) for k, v in consts.items()}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(options.__dict__, num_warps=num_warps))
    cubin = work / "k.cubin"
    cubin.write_bytes(k.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    n, ops = loop_mix(sass)
    per_warp = -(-regs // 8) * 8 * 32  # registers are allocated per warp, 8 a thread at a time
    blocks = min(32, 64 // num_warps, 65536 // (per_warp * num_warps))  # an SM's limits (sm_90)
    steps = 4 if overrides.get("UNROLL4") else 1
    return {"regs": regs, "stack_bytes": stack, "warps_per_sm": blocks * num_warps, "loop_instr": n,
            "steps_per_loop": steps, "instr_per_step": n / steps, **{op: ops[op] for op in OPS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--before", action="store_true", help="also the kernel as last timed (scan_before.py)")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()

    import torch
    import triton

    from hymba_batch.model.kernels import _scan_triton
    from hymba_batch.model.precompile import drive_engine, recorded_launches

    from . import scan_before

    kernels = [("now", _scan_triton, ({"UNROLL4": True}, {"UNROLL4": False}))]
    if a.before:
        kernels.append(("before", scan_before, ({"UNROLL4": True, "PREFETCH_BC": True},
                                                {"UNROLL4": True, "PREFETCH_BC": False})))
    result: dict = {"bench": "scan_static", "arch": f"sm_{a.arch}", "triton": triton.__version__,
                    "torch": torch.__version__, "rows": []}
    print(f"{'kernel':7} {'config':32} {'regs':>5} {'stack':>6} {'warps/SM':>8} {'loop':>6} {'/step':>6} "
          + " ".join(f"{op:>5}" for op in OPS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, switches in kernels:
            real = _scan_triton.selective_scan_varlen_triton
            _scan_triton.selective_scan_varlen_triton = module.selective_scan_varlen_triton
            try:
                with recorded_launches(a.arch) as launches:
                    drive_engine(torch.bfloat16, "small")
            finally:
                _scan_triton.selective_scan_varlen_triton = real
            launch = next(v for v in launches.values() if v[0].fn.__qualname__ == "_scan_varlen_kernel")
            for extra in switches:
                for be, nw in ((16, 1), (32, 1), (32, 2), (64, 1), (64, 2)):
                    cfg = {"BLOCK_E": be, **extra}
                    row = {"kernel": name, "BLOCK_E": be, "num_warps": nw, **extra,
                           **analyse(launch, cfg, nw, a.arch, Path(tmp))}
                    result["rows"].append(row)
                    label = f"BE{be} w{nw} " + " ".join(f"{k}={int(v)}" for k, v in extra.items())
                    print(f"{name:7} {label:32} {row['regs']:5} {row['stack_bytes']:6} {row['warps_per_sm']:8} "
                          f"{row['loop_instr']:6} {row['instr_per_step']:6.0f} " + " ".join(f"{row[op]:5}" for op in OPS), flush=True)
    line = json.dumps(result)
    if a.json_out:
        Path(a.json_out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
