"""hymba_batch.model: one GPU's worth of Hymba. Public API: ``load_model``, ``generate``,
``HymbaConfig``, ``HymbaForCausalLM``. Knows nothing of S3 buckets of data, Ray or text."""

from .config import ConfigError, HymbaConfig
from .hymba import HymbaForCausalLM
from .loader import CheckpointError, load_model
from .generate import generate

__all__ = ["ConfigError", "CheckpointError", "HymbaConfig", "HymbaForCausalLM", "load_model", "generate"]
