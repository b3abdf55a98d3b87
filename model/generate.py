"""``generate``: new token ids for a batch of prompts (mixed lengths), through the engine."""

from __future__ import annotations

from .hymba import HymbaForCausalLM


def generate(model: HymbaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_token_ids: list[int] | None = None, ignore_eos: bool = True,
             **engine_kwargs) -> list[list[int]]:
    """New token ids per prompt, greedy when temperature is 0. Generation stops at
    ``max_new_tokens``, or at a stop id (EOS too unless ``ignore_eos``; a stop id is kept).
    ``seed`` seeds request i with ``seed + i``. Raises ValueError for a prompt the engine rejects."""
    from .engine import Engine, EngineConfig, SamplingParams

    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=None if seed is None else seed + i,
                             stop_token_ids=tuple(stop_token_ids or ()), ignore_eos=ignore_eos)
              for i in range(len(prompts))]
    engine = Engine(model, EngineConfig(**engine_kwargs))
    outs = engine.generate(prompts, params)
    for i, o in enumerate(outs):
        if o.error:
            raise ValueError(f"prompt {i}: {o.error}")
    return [o.token_ids for o in outs]
