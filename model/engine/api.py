"""The engine's contract, tokens in and tokens out: sampling parameters per request and the
result per request. Plain dataclasses (they cross process boundaries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .constraints import TokenConstraint

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request. ``temperature == 0`` is greedy. ``seed`` makes sampling
    reproducible for this request whatever batch it runs in (None: derived from request id)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    min_new_tokens: int = 0          # EOS and stop tokens are masked until this many are generated
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output (CTRL / HF)
    presence_penalty: float = 0.0    # subtracted once from tokens already generated (OpenAI)
    frequency_penalty: float = 0.0   # subtracted per occurrence in the output so far (OpenAI)
    logprobs: bool = False           # return each sampled token's log-probability (the model's own)
    # Per-request decoding constraint (constraints.py): a fresh object per request, it holds that
    # request's state. Not compared, not part of the params' identity.
    constraint: "TokenConstraint | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        """Whether any repetition / presence / frequency penalty applies."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RequestOutput:
    """What the engine returns for one request."""

    request_id: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # None while running
    prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[float] | None = None  # per generated token, when SamplingParams.logprobs

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine's counters, for monitoring (``Engine.snapshot()``): plain numbers,
    cumulative since the engine was built where the name says so."""

    running: int             # sequences holding a cache slot (prefilling or decoding)
    waiting: int             # requests queued for a slot
    slots: int               # cache slots a sequence can hold (the scratch slot left out)
    blocks_used: int         # paged cache blocks held by sequences
    blocks_total: int        # paged cache blocks sequences can hold (the scratch block left out)
    steps: int               # engine steps run (cumulative)
    prefill_tokens: int      # prompt tokens prefilled, recomputation included (cumulative)
    decode_tokens: int       # tokens decoded (cumulative)
    prefill_s: float         # seconds in prefill steps (cumulative)
    decode_s: float          # seconds in decode steps (cumulative)
    preemptions: int         # sequences preempted for lack of cache (cumulative)

    @property
    def occupancy(self) -> float:
        """Running sequences over slots: how full the continuous batch is (0..1)."""
        return self.running / self.slots if self.slots else 0.0
