"""The Hymba network in one file: meta tokens, the hybrid attention + SSM mixer, the MLP, the
tied head (hymba-architecture.md §2-§4). Parameter names equal the HF checkpoint's.

The layer math lives here once. What depends on how a batch is laid out and cached (attention
over which keys, conv and scan from which state) is delegated to a ``SequenceOps`` object: the
uncached full forward below (``FullSequenceOps``) and the engine's prefill/decode ops
(``model/engine/runner.py``) implement the same four calls.

Knows nothing of tokenizers, Ray, files or text.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HymbaConfig
from .kernels.attention import attention_ref
from .kernels.conv import causal_conv1d_varlen
from .kernels.gate import silu_mul
from .kernels.rmsnorm import rmsnorm, rmsnorm_avg
from .kernels.rope import apply_rope
from .kernels.scan import selective_scan_varlen


class SequenceOps(Protocol):
    """What a layer needs from the batch layout and its caches. Tensors are packed [T, ...]."""

    cos: torch.Tensor  # [T, d_qk] in activation dtype
    sin: torch.Tensor

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor | None,
                  v: torch.Tensor | None) -> torch.Tensor:
        """q [T, nh, d] (rotated); k [T, nkv, d] (rotated), v [T, nkv, dv] for producers, None for
        consumers. Returns [T, nh*dv]."""

    def conv(self, layer: int, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """s [T, E] pre-conv SSM input -> SiLU(causal conv) [T, E]."""

    def scan(self, layer: int, u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
        """Selective scan (see kernels/scan.py) -> y [T, E]."""


# ---- small pieces ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)


def rope_cos_sin(cfg: HymbaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] (meta-inclusive) -> cos, sin [T, d_qk], computed in fp32, cast to dtype."""
    d = cfg.head_dim
    exps = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d
    inv_freq = 1.0 / (cfg.rope_base ** exps)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def derived(owner: nn.Module, name: str, w: torch.Tensor, make) -> torch.Tensor:  # noqa: ANN001
    """``make(w)``, kept on ``owner`` and made again when ``w`` changes (its storage or version):
    weights in the layout the GEMMs want, made once instead of every step."""
    key = (w.data_ptr(), 0 if w.is_inference() else w._version, w.dtype, w.device)  # (inference tensors keep no version)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = owner.__dict__[name] = (key, make(w))
    return hit[1]


def zero_padded(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``w`` [r, c] in the top-left corner of a zero [rows, cols]. A bf16 GEMM whose operand or
    output rows are not a multiple of 8 values (16 bytes) cannot use cuBLAS's Hopper kernels: in the
    H200 profile the head (32,001 outputs) ran as a Turing-era kernel and two GEMMs per layer as
    Ampere-era ones, which x_proj (132 outputs) and dt_proj (100 inputs) are the shapes for."""
    out = w.new_zeros(rows, cols)
    out[:w.shape[0], :w.shape[1]] = w
    return out


def _up(n: int, m: int = 8) -> int:
    return -(-n // m) * m


# ---- the hybrid layer --------------------------------------------------------------------------

class HymbaMixer(nn.Module):
    """Parallel attention heads and Mamba SSM heads sharing one input projection."""

    def __init__(self, cfg: HymbaConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, E, N, R = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
        self.producer = cfg.is_producer(layer)
        self.in_proj = nn.Linear(H, cfg.in_proj_rows(layer), bias=False)
        self.conv1d = nn.Conv1d(E, E, cfg.mamba_d_conv, groups=E, bias=cfg.mamba_conv_bias)
        self.x_proj = nn.ModuleList([nn.Linear(E, R + 2 * N, bias=False)])
        self.dt_proj = nn.ModuleList([nn.Linear(R, E, bias=True)])
        self.A_log = nn.ParameterList([nn.Parameter(torch.zeros(E, N))])
        self.D = nn.ParameterList([nn.Parameter(torch.ones(E))])
        self.dt_layernorm = RMSNorm(R, cfg.rms_norm_eps)
        self.B_layernorm = RMSNorm(N, cfg.rms_norm_eps)
        self.C_layernorm = RMSNorm(N, cfg.rms_norm_eps)
        self.pre_avg_layernorm1 = RMSNorm(E, cfg.rms_norm_eps)
        self.pre_avg_layernorm2 = RMSNorm(E, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(E, H, bias=False)
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.splits = [nh * d] + ([nkv * d, nkv * cfg.v_head_dim] if self.producer else []) + [E, E]

    def forward(self, x: torch.Tensor, ops: SequenceOps) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        nh, nkv, d, dv = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.v_head_dim
        parts = self.in_proj(x).split(self.splits, dim=-1)
        if self.producer:
            q, k, v, s, z = parts
            k = apply_rope(k.reshape(T, nkv, d), ops.cos, ops.sin)
            v = v.reshape(T, nkv, dv)
        else:
            q, s, z = parts
            k = v = None
        q = apply_rope(q.reshape(T, nh, d), ops.cos, ops.sin)
        attn = ops.attention(self.layer, q, k, v)

        E = cfg.d_inner
        u = ops.conv(self.layer, s, self.conv1d.weight.view(E, -1), self.conv1d.bias)
        R, N = cfg.mamba_dt_rank, cfg.mamba_d_state
        xw = derived(self, "_x_proj", self.x_proj[0].weight, lambda w: zero_padded(w, _up(w.shape[0]), w.shape[1]))
        dt, B, C = F.linear(u, xw)[:, :R + 2 * N].split([R, N, N], dim=-1)
        dw = derived(self, "_dt_proj", self.dt_proj[0].weight, lambda w: zero_padded(w, w.shape[0], _up(w.shape[1])))
        dt = self.dt_layernorm(dt)
        if dw.shape[1] > R:  # K padded with zeros on both sides: the same products
            dt = F.pad(dt, (0, dw.shape[1] - R))
        dt = F.linear(dt, dw)  # bias goes in the scan, fp32
        A = derived(self, "_A", self.A_log[0], lambda a: -torch.exp(a.float()))
        y = ops.scan(self.layer, u, dt, A, self.B_layernorm(B), self.C_layernorm(C),
                     self.D[0], z, self.dt_proj[0].bias)
        n1, n2 = self.pre_avg_layernorm1, self.pre_avg_layernorm2
        return self.out_proj(rmsnorm_avg(attn, n1.weight, y, n2.weight, n1.eps))  # (n1(attn) + n2(y)) / 2


class Expert(nn.Module):
    def __init__(self, cfg: HymbaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class MoE(nn.Module):
    """A single dense SiLU-gated MLP (the checkpoint names it ``moe.experts.0``)."""

    def __init__(self, cfg: HymbaConfig):
        super().__init__()
        self.experts = nn.ModuleList([Expert(cfg)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[0](x)


class HymbaLayer(nn.Module):
    def __init__(self, cfg: HymbaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mamba = HymbaMixer(cfg, layer)
        self.pre_moe_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg)

    def forward(self, h: torch.Tensor, ops: SequenceOps) -> torch.Tensor:
        h = h + self.mamba(self.input_layernorm(h), ops)
        return h + self.moe(self.pre_moe_layernorm(h))


class HymbaBackbone(nn.Module):
    def __init__(self, cfg: HymbaConfig):
        super().__init__()
        # Zeros, not the Embedding's own normal_ init: every weight comes from a checkpoint or
        # random_model's init, and normal_ on the meta device imports torch._dynamo, 1.0 s of a
        # fresh process's first load_model on a CPU (loading then took 0.02 s)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.memory_tokens = nn.Parameter(torch.zeros(cfg.num_memory_tokens, cfg.hidden_size))
        self.layers = nn.ModuleList([HymbaLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class HymbaForCausalLM(nn.Module):
    """The whole model. ``logits(ids)`` is the uncached reference forward of the public API."""

    def __init__(self, cfg: HymbaConfig):
        super().__init__()
        self.config = cfg
        self.model = HymbaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def run_layers(self, h: torch.Tensor, ops: SequenceOps, hidden: list | None = None) -> torch.Tensor:
        """h [T, H] packed embeddings -> final-norm output [T, H]."""
        for layer in self.model.layers:
            if hidden is not None:
                hidden.append(h)
            h = layer(h, ops)
        h = self.model.final_layernorm(h)
        if hidden is not None:
            hidden.append(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 (a GEMM in the model dtype, then upcast). The GEMM runs against the head's
        weight padded with zero rows to a multiple of 64: with Hymba's 32,001 rows the output's row
        stride is not 16-byte aligned and cuBLAS falls back to a slow kernel (H200 profile: a
        Turing-era GEMM, 2.2 ms of a 33.4 ms G decode step)."""
        w = derived(self, "_head", self.lm_head.weight, lambda w: zero_padded(w, _up(w.shape[0], 64), w.shape[1]))
        return F.linear(h, w)[..., :self.config.vocab_size].float().contiguous()

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, hidden: list | None = None) -> torch.Tensor:
        """Uncached forward of one sequence with the meta tokens prepended; returns the final-norm
        output of the real tokens [T, H]."""
        ids = input_ids.to(self.device).long().reshape(-1)
        x = torch.cat([self.model.memory_tokens, self.model.embed_tokens(ids)], 0)
        ops = FullSequenceOps(self, x.shape[0])
        return self.run_layers(x, ops, hidden)[self.config.num_memory_tokens:]

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> logits [T, vocab] (fp32); full sequence, no cache."""
        return self.head(self.forward_full(input_ids))


class FullSequenceOps:
    """Uncached ops for one sequence of ``T`` meta-inclusive tokens starting at index 0.

    Also used once per model to compute the meta tokens' shared K/V, conv and SSM states:
    after ``run_layers``, ``kv[layer]``, ``conv_state[layer]`` and ``ssm_state[layer]`` hold them.
    """

    def __init__(self, model: HymbaForCausalLM, T: int):
        cfg = model.config
        self.cfg = cfg
        dev, dtype = model.device, model.dtype
        self.idx = torch.arange(T, device=dev)
        self.cos, self.sin = rope_cos_sin(cfg, self.idx, dtype)
        self.cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        n, E = cfg.num_hidden_layers, cfg.d_inner
        self.conv_state = torch.zeros(n, 1, E, cfg.mamba_d_conv - 1, dtype=dtype, device=dev)
        self.ssm_state = torch.zeros(n, 1, E, cfg.mamba_d_state, dtype=torch.float32, device=dev)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attention(self, layer, q, k, v):
        cfg = self.cfg
        if k is not None:
            self.kv[layer] = (k, v)
        k, v = self.kv[cfg.kv_producer[layer]]
        window = None if cfg.is_global(layer) else cfg.sliding_window
        return attention_ref(q, k, v, self.idx, self.idx, window, cfg.num_memory_tokens)

    def conv(self, layer, s, weight, bias):
        return causal_conv1d_varlen(s, weight, bias, self.cu, self.conv_state[layer], self.slot)

    def scan(self, layer, u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_varlen(u, delta, A, B, C, D, z, delta_bias, self.cu,
                                     self.ssm_state[layer], self.slot)
