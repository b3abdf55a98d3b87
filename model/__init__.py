"""hymba_batch.model: one GPU's worth of Hymba. Public API: ``load_model``, ``generate``,
``HymbaConfig``, ``HymbaForCausalLM``. Knows nothing of S3 buckets of data, Ray or text.

The torch-backed names are imported on first use, so torch-free parts (``config``,
``precheck``) load without torch (the CLI's pre-flight checks stay fast)."""

from importlib import import_module
from typing import Any

from .config import ConfigError, HymbaConfig

_LAZY = {"HymbaForCausalLM": ".hymba", "CheckpointError": ".loader", "load_model": ".loader",
         "generate": ".generate"}

__all__ = ["ConfigError", "CheckpointError", "HymbaConfig", "HymbaForCausalLM", "load_model", "generate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # importing .generate binds the submodule here; the function wins
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
