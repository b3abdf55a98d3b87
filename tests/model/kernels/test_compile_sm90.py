"""Every Triton kernel, launched as the engine launches it, compiles for the H200 (sm_90) with
Triton's own compiler and ptxas, on the CPU: what the interpreter tests cannot see (launch
options, register and shared-memory limits, the compiler's type rules). ``model/precompile.py``
(the image's kernel cache) does the work, in a process of its own (Triton decides interpreter
vs compiler at import); each variant it compiles lands in the cache it was given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import hymba_batch.model.kernels as kernels_pkg


def launched_kernels() -> set[str]:
    """Names of the jit functions some wrapper launches (``name[grid](...)``), from the sources."""
    names = set()
    for path in Path(kernels_pkg.__file__).parent.glob("_*_triton.py"):
        src = path.read_text()
        names |= {n for n in re.findall(r"@triton\.jit[^\n]*\ndef (\w+)", src) if re.search(rf"\b{n}\[", src)}
    return names


def test_every_launched_kernel_compiles_for_sm90_into_the_cache(tmp_path):
    cache = tmp_path / "triton-cache"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
    p = subprocess.run([sys.executable, "-m", "hymba_batch.model.precompile", "--quick"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    expected = launched_kernels()
    assert len(expected) >= 12, expected  # the regex still finds the launches
    assert set(res["compiled"]) == expected, f"launched by no engine step here: {expected - set(res['compiled'])}"
    cubins = Counter(f.name.removesuffix(".cubin") for f in cache.glob("*/*.cubin"))
    assert cubins == Counter(res["compiled"]), "every compiled variant has its own cache entry"
