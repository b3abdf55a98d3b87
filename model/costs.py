"""Bytes and FLOPs of Hymba, the one source every benchmark and the cache sizing use.

Counts follow hymba-architecture.md §2 and §6: parameters per tensor, matrix FLOPs per token
(2 per multiply-add), attention FLOPs by the number of keys a query sees, cache bytes per
sequence in this engine's layout (SWA ring of window+1 entries, global K/V per token, conv and
SSM state per slot; meta K/V once per model).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import HymbaConfig


def _itemsize(dtype_bytes: int | None) -> int:
    return 2 if dtype_bytes is None else dtype_bytes


def param_count(cfg: HymbaConfig) -> int:
    """Unique parameters (the tied head counted once)."""
    from .loader import expected_shapes
    total = 0
    for shape in expected_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def weight_bytes(cfg: HymbaConfig, dtype_bytes: int = 2) -> int:
    return param_count(cfg) * dtype_bytes


def matmul_flops_per_token(cfg: HymbaConfig, with_head: bool = True) -> int:
    """2 x (multiply-adds of every projection a token goes through), excluding attention scores."""
    H, E, N, R, I = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.intermediate_size
    per_layer = 0
    for layer in range(cfg.num_hidden_layers):
        per_layer += cfg.in_proj_rows(layer) * H + (R + 2 * N) * E + R * E + E * H + 3 * H * I
    flops = 2 * per_layer
    if with_head:
        flops += 2 * H * cfg.vocab_size
    return flops


def attention_flops(cfg: HymbaConfig, keys_per_layer: list[int]) -> int:
    """FLOPs of scores + weighted sum for one query, given the keys it sees in each layer."""
    nh, d, dv = cfg.num_attention_heads, cfg.head_dim, cfg.v_head_dim
    return sum(2 * nh * (d + dv) * k for k in keys_per_layer)


def keys_seen(cfg: HymbaConfig, real_index: int) -> list[int]:
    """Keys a query at real index ``real_index`` (0-based) attends in each layer (meta included)."""
    M, W = cfg.num_memory_tokens, cfg.sliding_window
    own = real_index + 1
    return [M + (own if cfg.is_global(i) else min(own, W + 1)) for i in range(cfg.num_hidden_layers)]


def prefill_flops(cfg: HymbaConfig, prompt_len: int) -> int:
    """FLOPs to prefill one prompt (logits for the last token only)."""
    mm = matmul_flops_per_token(cfg, with_head=False) * prompt_len + 2 * cfg.hidden_size * cfg.vocab_size
    attn = sum(attention_flops(cfg, keys_seen(cfg, i)) for i in range(prompt_len))
    return mm + attn


def decode_flops(cfg: HymbaConfig, prompt_len: int, new_tokens: int) -> int:
    """FLOPs of the decode steps that produce tokens 2..new_tokens (the first comes from prefill)."""
    mm = matmul_flops_per_token(cfg) * (new_tokens - 1)
    attn = sum(attention_flops(cfg, keys_seen(cfg, prompt_len + j)) for j in range(new_tokens - 1))
    return mm + attn


@dataclass(frozen=True)
class CacheBytes:
    """Engine cache bytes for one config (dtype_bytes for K/V and conv, ssm_bytes for SSM state)."""

    slot: int              # per sequence, fixed: conv + SSM state + SWA rings
    per_global_token: int  # per real token in global layers' paged K/V
    meta: int              # once per model: meta K/V + conv/SSM seeds

    def sequence(self, context: int) -> int:
        return self.slot + self.per_global_token * context


def cache_bytes(cfg: HymbaConfig, dtype_bytes: int = 2, ssm_bytes: int | None = None) -> CacheBytes:
    """``ssm_bytes`` None: the SSM state in the K/V dtype (the engine's default)."""
    ssm_bytes = dtype_bytes if ssm_bytes is None else ssm_bytes
    n, E, N, K = cfg.num_hidden_layers, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_d_conv
    kv_tok = cfg.num_key_value_heads * (cfg.head_dim + cfg.v_head_dim) * dtype_bytes
    producers = cfg.producers
    n_global = sum(cfg.is_global(p) for p in producers)
    n_swa = len(producers) - n_global
    ring = n_swa * (cfg.sliding_window + 1) * kv_tok
    states = n * E * (K - 1) * dtype_bytes + n * E * N * ssm_bytes
    meta = len(producers) * cfg.num_memory_tokens * kv_tok + n * E * (K - 1) * dtype_bytes + n * E * N * 4
    return CacheBytes(slot=states + ring, per_global_token=n_global * kv_tok, meta=meta)
