"""Token sampling on the device, without host syncs: greedy, temperature, top-k, top-p; and
the per-request logits transforms applied before it (repetition / presence / frequency penalties,
a token bitmask from a decoding constraint) and the sampled tokens' log-probabilities.

Randomness is a counter-based hash of (request seed, token index, vocab id), so a request's
samples do not depend on which batch, step or process it ran in (Gumbel-max trick).
"""

from __future__ import annotations

import torch

_M1 = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_M2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M3 = 0x94D049BB133111EB - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic; logical shifts emulated)."""
    mask = lambda s: (1 << (64 - s)) - 1  # noqa: E731
    x = x + _M1
    x = (x ^ ((x >> 30) & mask(30))) * _M2
    x = (x ^ ((x >> 27) & mask(27))) * _M3
    return x ^ ((x >> 31) & mask(31))


_BELOW_ONE = 1.0 - 2.0 ** -24  # the largest float32 below 1


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1) determined by (seed, step, column) only. Never 1: the top
    mantissa, (2^24 - 0.5) / 2^24, rounds to 1.0 in float32, whose Gumbel noise is +inf, and
    +inf plus a masked -inf logit is NaN, which argmax picks: a sampled row had a vocab / 2^24
    chance per step (1 in ~520 for Hymba) to get a token its grammar mask, top-k or top-p had
    excluded; half the 350-token JSON rows of the H200 enrich bench broke on it."""
    col = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    key = _mix(_mix(seeds.long() * 1_000_003 + steps.long())[:, None] + col[None, :])
    mant = (key >> 40) & ((1 << 24) - 1)
    return ((mant.float() + 0.5) / float(1 << 24)).clamp(max=_BELOW_ONE)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
    """logits [B, V] fp32; per-row temperature/top_p (float), top_k (long, 0 = off), seeds,
    steps (long). Rows with temperature 0 are greedy; ``all_greedy`` (known on the host by the
    caller) skips the sampling work. Returns token ids [B] (long)."""
    greedy = logits.argmax(-1)
    if all_greedy:
        return greedy
    V = logits.shape[-1]
    t = temperature.clamp(min=1e-5)[:, None]
    scaled = logits / t
    # top-k: drop everything below the k-th largest value
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_vals, _ = scaled.sort(-1, descending=True)
    kth = sorted_vals.gather(-1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    # top-p over the remaining distribution (keep the smallest prefix with mass >= p)
    probs = torch.softmax(sorted_vals.masked_fill(sorted_vals < kth, float("-inf")), -1)
    before = probs.cumsum(-1) - probs
    keep_sorted = before < top_p[:, None]
    cutoff = sorted_vals.masked_fill(~keep_sorted, float("inf")).min(-1, keepdim=True).values
    scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, V)))
    sampled = (scaled + gumbel).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; counts [B, V] (each token's occurrences in the output so far), seen
    [B, V] bool (in the prompt or the output); per-row repetition / presence / frequency [B].
    Repetition (CTRL, as Hugging Face): a seen token's logit is divided by the penalty when
    positive, multiplied when negative. Presence / frequency (OpenAI): minus presence once, minus
    frequency x count, for tokens of the output. Returns new logits."""
    rp = repetition[:, None]
    out = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return out - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


_BYTE_BITS = None


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [B, ceil(V/32)] (bit t % 32 of word t // 32 = token t) -> bool [B, V] allowed."""
    global _BYTE_BITS
    if _BYTE_BITS is None or _BYTE_BITS.device != bitmask.device:
        _BYTE_BITS = (1 << torch.arange(8, dtype=torch.int32, device=bitmask.device)).to(torch.uint8)
    as_bytes = bitmask.contiguous().view(torch.uint8)  # little-endian: byte j of a word = bits 8j..8j+7
    bits = (as_bytes[:, :, None] & _BYTE_BITS) != 0
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; bitmask int32 [B, ceil(V/32)] on the same device: disallowed tokens get
    -inf. Returns new logits."""
    return logits.masked_fill(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits) per row: logits [B, V], tokens [B] -> fp32 [B]."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None].long())[:, 0]
