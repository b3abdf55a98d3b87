"""hymba_batch.model.engine: continuous-batching inference over the cross-layer cache."""

from .api import RequestOutput, SamplingParams
from .engine import Engine, EngineConfig, QueueFull

__all__ = ["Engine", "EngineConfig", "QueueFull", "RequestOutput", "SamplingParams"]
