"""Kernel tests run each fast kernel against its ``*_ref`` twin.

* Tests without a marker run the Triton kernels on the CPU under the Triton interpreter. They run
  in CI. Triton decides interpreter vs compiler when a function is decorated, so its own library
  (``tl.sum`` ...) must be imported with ``TRITON_INTERPRET=1``: without CUDA this conftest imports
  triton that way, then restores the variable, and sets it again only inside each kernel test
  (where the lazily imported ``_*_triton`` modules get decorated). Other tests of the session keep
  the ref kernels on the CPU instead of running every op through the interpreter. On a machine
  with CUDA these tests skip: there the kernels must be compiled (a module decorated under the
  interpreter stays interpreted for the whole process); the ``gpu`` tests cover them.
* ``@pytest.mark.gpu`` tests run the compiled kernels on CUDA (``pytest -m gpu`` on the GPU
  machine); without CUDA they fail, they do not skip.

The interpreter rounds fp32 -> bf16 by truncation (Triton 3.9; its 'rtne' mode does not carry into
the exponent), while compiled kernels round to nearest even like PyTorch. The interpreter tests
patch that one conversion to round to nearest even, so bf16 results can be compared to the ref
as closely as on the GPU.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch


def _import_triton_for_interpreter() -> str | None:
    """Import triton with TRITON_INTERPRET=1 (then restore the variable); returns why the
    interpreter tests cannot run, or None."""
    if torch.cuda.is_available():
        return None
    if "triton" not in sys.modules:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError:
            return "triton is not installed (the CPU kernel tests run it under TRITON_INTERPRET=1)"
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl
    if not isinstance(tl.standard.sum, InterpretedFunction):
        return ("triton was imported without TRITON_INTERPRET=1 before this conftest ran; run with "
                "TRITON_INTERPRET=1 in the environment")
    return None


_INTERPRETER_PROBLEM = _import_triton_for_interpreter()


def _patch_interpreter_bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton.language as tl
    import triton.runtime.interpreter as interp

    orig = interp._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            f = np.ascontiguousarray(input, dtype=np.float32)
            bits = f.view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            out = np.where(np.isnan(f), np.uint16(0x7FC0), out)
            return out.reshape(f.shape)
        return orig(input, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interp, "_convert_float", convert)


@pytest.fixture(autouse=True)
def kernel_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'cuda' for gpu tests (which fail without CUDA), 'cpu' (Triton interpreter) otherwise."""
    if request.node.get_closest_marker("gpu") is not None:
        assert torch.cuda.is_available(), "gpu-marked kernel test run without a CUDA device"
        assert os.environ.get("TRITON_INTERPRET") != "1", \
            "gpu-marked kernel tests must run compiled kernels: unset TRITON_INTERPRET"
        return "cuda"
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernels are covered by the gpu-marked tests")
    if _INTERPRETER_PROBLEM:  # a missing dev dependency must not pass silently as a skip
        pytest.fail(_INTERPRETER_PROBLEM)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _patch_interpreter_bf16_rounding(monkeypatch)
    return "cpu"
