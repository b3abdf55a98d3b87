"""Every Triton kernel, launched as the engine launches it, compiles for the H200 (sm_90) with
Triton's own compiler and ptxas, on the CPU: what the interpreter tests cannot see (launch
options, register and shared-memory limits, the compiler's type rules). ``sm90_launches.py`` does
the work in a process of its own (Triton decides interpreter vs compiler at import)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hymba_batch.model.kernels as kernels_pkg


def launched_kernels() -> set[str]:
    """Names of the jit functions some wrapper launches (``name[grid](...)``), from the sources."""
    names = set()
    for path in Path(kernels_pkg.__file__).parent.glob("_*_triton.py"):
        src = path.read_text()
        names |= {n for n in re.findall(r"@triton\.jit[^\n]*\ndef (\w+)", src) if re.search(rf"\b{n}\[", src)}
    return names


def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_launches.py"))], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    compiled = json.loads(p.stdout.strip().splitlines()[-1])["compiled"]
    expected = launched_kernels()
    assert len(expected) >= 12, expected  # the regex still finds the launches
    assert set(compiled) == expected, f"launched by no engine step here: {expected - set(compiled)}"
