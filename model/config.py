"""HymbaConfig: the model's shape, read from a Hugging Face ``config.json`` and validated.

Owns: the mapping from HF config fields to a frozen dataclass, every supported-value check
(with an error naming the field), and the derived quantities the network and the engine use
(KV-reuse producers, global vs sliding-window layers, head widths, the NTK RoPE base).
Knows nothing of weights, devices, caches or text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field has a value this implementation does not support."""


# Fields of the HF config that carry no meaning for inference: accepted, not used.
_INFORMATIONAL = {
    "architectures", "auto_map", "attention_dropout", "initializer_range", "router_aux_loss_coef",
    "output_router_logits", "use_cache", "seq_length", "transformers_version", "torch_dtype",
    "calc_logits_for_entire_prompt", "attn_implementation", "attn_implementation_new",
    "use_mamba_kernels", "v_head_dim", "kv_reuse_every_i_layer", "model_type", "dtype",
}


@dataclass(frozen=True)
class HymbaConfig:
    """Shape and hyper-parameters of one Hymba checkpoint (names follow the HF config)."""

    vocab_size: int = 32001
    hidden_size: int = 1600
    num_hidden_layers: int = 32
    num_attention_heads: int = 25
    num_key_value_heads: int = 5
    attn_hidden_size: int = -1
    kq_head_dim: int = -1
    intermediate_size: int = 5504
    mamba_expand: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_dt_rank: int = 100
    mamba_conv_bias: bool = True
    num_memory_tokens: int = 128
    sliding_window: int = 1024
    global_attn_idx: tuple[int, ...] = (0, 15, 31)
    kv_reuse_group: tuple[tuple[int, ...], ...] = ()
    rope_theta: float = 10000.0
    rope_type: str = "ntk"
    orig_max_position_embeddings: int = 2048
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # derived (filled by __post_init__)
    kv_producer: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check(self.hidden_size > 0, "hidden_size", self.hidden_size, "a positive integer")
        _check(self.num_hidden_layers > 0, "num_hidden_layers", self.num_hidden_layers, "> 0")
        _check(self.num_attention_heads > 0 and self.num_key_value_heads > 0
               and self.num_attention_heads % self.num_key_value_heads == 0,
               "num_key_value_heads", self.num_key_value_heads,
               f"a positive divisor of num_attention_heads={self.num_attention_heads}")
        _check(self.attn_dim % self.num_attention_heads == 0, "attn_hidden_size",
               self.attn_hidden_size, "a multiple of num_attention_heads")
        _check(self.d_inner % self.num_attention_heads == 0, "mamba_expand", self.mamba_expand,
               "such that mamba_expand*hidden_size divides by num_attention_heads (v head dim)")
        _check(self.head_dim % 2 == 0 and self.head_dim > 2, "kq_head_dim", self.kq_head_dim,
               "an even q/k head dim > 2")
        _check(self.mamba_d_conv >= 2, "mamba_d_conv", self.mamba_d_conv, ">= 2")
        _check(self.mamba_d_state > 0, "mamba_d_state", self.mamba_d_state, "> 0")
        _check(self.mamba_dt_rank > 0, "mamba_dt_rank", self.mamba_dt_rank, "> 0")
        _check(self.num_memory_tokens >= 0, "num_memory_tokens", self.num_memory_tokens, ">= 0")
        _check(self.sliding_window > 0, "sliding_window", self.sliding_window, "> 0")
        _check(self.rope_type in ("ntk", "default"), "rope_type", self.rope_type, "'ntk' or 'default'")
        _check(self.vocab_size > 0, "vocab_size", self.vocab_size, "> 0")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        n = self.num_hidden_layers
        for i in self.global_attn_idx:
            _check(0 <= i < n, "global_attn_idx", list(self.global_attn_idx), f"layer indices in [0, {n})")
        producer = list(range(n))
        for group in self.kv_reuse_group:
            _check(len(group) >= 2, "kv_reuse_group", group, "groups of >= 2 layers (producer first)")
            for i in group:
                _check(0 <= i < n and producer[i] == i and not any(
                    i in g for g in self.kv_reuse_group if g is not group),
                       "kv_reuse_group", [list(g) for g in self.kv_reuse_group],
                       f"disjoint groups of layer indices in [0, {n})")
            head, *rest = group
            _check(all(r > head for r in rest), "kv_reuse_group", list(group),
                   "a group whose producer (first element) precedes its consumers")
            kinds = {i in self.global_attn_idx for i in group}
            _check(len(kinds) == 1, "kv_reuse_group", list(group),
                   "groups that are all global or all sliding-window (mixed groups are unsupported)")
            for r in rest:
                producer[r] = head
        object.__setattr__(self, "kv_producer", tuple(producer))

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def attn_dim(self) -> int:
        return self.hidden_size if self.attn_hidden_size == -1 else self.attn_hidden_size

    @property
    def head_dim(self) -> int:
        """q/k head dim."""
        return self.attn_dim // self.num_attention_heads if self.kq_head_dim == -1 else self.kq_head_dim

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def v_head_dim(self) -> int:
        return self.d_inner // self.num_attention_heads

    @property
    def kv_group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_global(self, layer: int) -> bool:
        return layer in self.global_attn_idx

    def is_producer(self, layer: int) -> bool:
        return self.kv_producer[layer] == layer

    @property
    def producers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_producer(i))

    def in_proj_rows(self, layer: int) -> int:
        rows = self.num_attention_heads * self.head_dim + 2 * self.d_inner
        if self.is_producer(layer):
            rows += self.num_key_value_heads * (self.head_dim + self.v_head_dim)
        return rows

    @property
    def rope_base(self) -> float:
        """NTK-scaled RoPE base (factor 2 hard-coded by the reference; exponent d/(d-2))."""
        if self.rope_type == "default":
            return float(self.rope_theta)
        f, d = 2.0, self.head_dim
        ratio = f * self.max_position_embeddings / self.orig_max_position_embeddings - (f - 1)
        return float(self.rope_theta) * ratio ** (d / (d - 2))

    # ---- I/O ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "HymbaConfig":
        """Validate a HF Hymba config dict; raise ConfigError naming the field on bad values."""
        d = dict(raw)
        mt = d.get("model_type")
        if mt != "hymba":
            raise ConfigError(f"{source}: model_type is {mt!r}; this is not a Hymba config (expected 'hymba')")
        if d.get("mamba_dt_rank") == "auto" and isinstance(d.get("hidden_size", cls.hidden_size), int):
            d["mamba_dt_rank"] = math.ceil(d.get("hidden_size", cls.hidden_size) / 16)
        if d.get("rope_type") is None and "rope_type" in d:
            d["rope_type"] = "default"
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "kv_producer" or f.name not in d:
                continue
            v = d[f.name]
            try:
                if f.name == "global_attn_idx":
                    v = tuple(int(i) for i in v)
                elif f.name == "kv_reuse_group":
                    v = tuple(tuple(int(i) for i in g) for g in (v or ()))
                elif f.name in ("rope_theta", "rms_norm_eps"):
                    v = float(v)
                elif f.name in ("mamba_conv_bias", "tie_word_embeddings"):
                    if not isinstance(v, bool):
                        raise TypeError
                elif f.name == "rope_type":
                    v = str(v)
                else:
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise TypeError
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: field {f.name!r} has value {d[f.name]!r} of the wrong type") from None
            kwargs[f.name] = v
        n = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        hidden = kwargs.get("hidden_size", cls.hidden_size)
        fixed = {  # field: (value we require, description)
            "num_mamba": (1, "1"),
            "num_experts": (1, "1 (a single dense MLP)"),
            "num_experts_per_tok": (1, "1"),
            "memory_tokens_interspersed_every": (0, "0 (meta tokens only at the start)"),
            "kq_norm": ("none", "'none'"),
            "rope": (True, "true"),
            "mamba_proj_bias": (False, "false"),
            "mamba_inner_layernorms": (True, "true"),
            "kv_weight_reuse": (False, "false"),
            "hidden_act": ("silu", "'silu'"),
            "mlp_hidden_act": ("silu", "'silu'"),
        }
        for key, (want, desc) in fixed.items():
            if key in d and d[key] != want:
                raise ConfigError(f"{source}: field {key!r} = {d[key]!r} is unsupported; expected {desc}")
        lt = d.get("layer_type")
        if lt is not None and (len(lt) != n or any(t != "h" for t in lt)):
            raise ConfigError(f"{source}: field 'layer_type' must list {n} entries, all 'h' (hybrid); got {lt!r}")
        expand = kwargs.get("mamba_expand", cls.mamba_expand)
        conv_dim = d.get("conv_dim")
        if conv_dim is not None:
            vals = list(conv_dim.values()) if isinstance(conv_dim, dict) else list(conv_dim)
            if len(vals) != n or any(v != expand * hidden for v in vals):
                raise ConfigError(f"{source}: field 'conv_dim' must give {expand * hidden} "
                                  f"(mamba_expand*hidden_size) for each of {n} layers")
        every = d.get("kv_reuse_every_i_layer", -1)
        if every not in (-1, None) and not d.get("kv_reuse_group"):
            raise ConfigError(f"{source}: field 'kv_reuse_every_i_layer' = {every!r} is unsupported; "
                              "use kv_reuse_group")
        names = {f.name for f in fields(cls)} - {"kv_producer"}
        unknown = sorted(k for k in d if k not in names and k not in _INFORMATIONAL
                         and k not in fixed and k not in ("layer_type", "conv_dim") and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; not a Hymba config this version understands")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "HymbaConfig":
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: not found (a Hymba checkpoint folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(p))

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json form of this config (the reference's keys)."""
        n = self.num_hidden_layers
        return {
            "architectures": ["HymbaForCausalLM"],
            "model_type": "hymba",
            "attention_dropout": 0.0,
            "attn_hidden_size": self.attn_hidden_size,
            "attn_implementation": "flex",
            "attn_implementation_new": "flex",
            "bos_token_id": self.bos_token_id,
            "calc_logits_for_entire_prompt": False,
            "conv_dim": {str(i): self.d_inner for i in range(n)},
            "eos_token_id": self.eos_token_id,
            "global_attn_idx": list(self.global_attn_idx),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "kq_head_dim": self.kq_head_dim,
            "kq_norm": "none",
            "kv_reuse_every_i_layer": -1,
            "kv_reuse_group": [list(g) for g in self.kv_reuse_group],
            "kv_weight_reuse": False,
            "layer_type": ["h"] * n,
            "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_d_conv": self.mamba_d_conv,
            "mamba_d_state": self.mamba_d_state,
            "mamba_dt_rank": self.mamba_dt_rank,
            "mamba_expand": self.mamba_expand,
            "mamba_inner_layernorms": True,
            "mamba_proj_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "memory_tokens_interspersed_every": 0,
            "mlp_hidden_act": "silu",
            "num_attention_heads": self.num_attention_heads,
            "num_experts": 1,
            "num_experts_per_tok": 1,
            "num_hidden_layers": n,
            "num_key_value_heads": self.num_key_value_heads,
            "num_mamba": 1,
            "num_memory_tokens": self.num_memory_tokens,
            "orig_max_position_embeddings": self.orig_max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope": True,
            "rope_theta": self.rope_theta,
            "rope_type": self.rope_type,
            "seq_length": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": False,
            "v_head_dim": self.v_head_dim,
            "vocab_size": self.vocab_size,
        }

    def with_overrides(self, **kw: Any) -> "HymbaConfig":
        return replace(self, **kw)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"field {name!r} = {value!r} is unsupported; expected {expected}")


def real_config_dict() -> dict[str, Any]:
    """The released nvidia/Hymba-1.5B config (as in its config.json)."""
    groups = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
              [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]
    return HymbaConfig(kv_reuse_group=tuple(tuple(g) for g in groups)).to_hf_dict()
