"""The one switch between fast kernels and their ``*_ref`` twins.

``use_fast(x)`` is true when ``x`` is on CUDA, Triton imports, and neither the environment
(``HYMBA_KERNELS=ref``) nor a test (``force("ref")``) asked for the reference path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_forced: str | None = None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def mode() -> str:
    """'ref' or 'fast' (what was asked for; fast still needs CUDA or the Triton interpreter)."""
    return _forced or os.environ.get("HYMBA_KERNELS", "fast")


def use_fast(x: torch.Tensor) -> bool:
    if mode() == "ref" or not triton_available():
        return False
    return x.is_cuda or interpret_mode()


@contextlib.contextmanager
def force(which: str) -> Iterator[None]:
    """Force 'ref' or 'fast' kernels inside a block (tests)."""
    global _forced
    if which not in ("ref", "fast"):
        raise ValueError(f"kernel mode must be 'ref' or 'fast', not {which!r}")
    old, _forced = _forced, which
    try:
        yield
    finally:
        _forced = old
