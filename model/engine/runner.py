"""Runs the model over one engine step: a packed varlen prefill (chunks of several sequences,
continuing from their cached state) or a decode of one token for every running sequence.

The two ``*Ops`` classes implement ``hymba.SequenceOps`` over the ``KVCache``; the layer math
itself stays in ``hymba.py``. Prefill attention is packed varlen over the cache (a Triton kernel on
CUDA, its plain-PyTorch twin elsewhere): nothing is padded, so a step's time and memory follow its
real tokens. Decode optionally runs under CUDA graphs, one per batch bucket.
"""

from __future__ import annotations

import torch

from ..hymba import HymbaForCausalLM, rope_cos_sin
from ..kernels.attention import attention_decode, attention_prefill
from ..kernels.conv import causal_conv1d_update, causal_conv1d_varlen
from ..kernels.scan import selective_scan_varlen, selective_state_update
from .cache import KVCache
from .transfer import to_device


class PrefillOps:
    """Packed chunks: sequence b owns rows [cu[b], cu[b+1]) and has ``start[b]`` tokens cached."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int]):
        cfg, dev = cache.cfg, cache.conv.device
        self.cache, self.cfg = cache, cfg
        B = len(slots)
        self.B, self.Lmax = B, max(lengths)
        self.starts_host = starts
        self.slot_idx, self.start, self.lens = to_device([slots, starts, lengths], torch.long, dev)
        lens = self.lens
        self.cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
        self.cu[1:] = lens.cumsum(0)
        # packed row t -> (sequence b, offset i in its chunk); real position m = start[b] + i
        T = sum(lengths)  # a host int: repeat_interleave would otherwise read it from the device (a sync)
        self.row_b = torch.repeat_interleave(torch.arange(B, device=dev), lens, output_size=T)
        self.row_i = torch.arange(T, device=dev) - self.cu[:-1].long()[self.row_b]
        self.row_m = self.start[self.row_b] + self.row_i
        self.cos, self.sin = rope_cos_sin(cfg, self.row_m + cfg.num_memory_tokens, cache.shape.dtype)
        self.kv: dict[int, tuple[torch.Tensor, ...]] = {}
        self.last_rows = self.cu[1:].long() - 1

    def _max_hist(self, window: int | None) -> int:
        """Most cached tokens any query of this step sees (a host int: no device sync)."""
        most = max(self.starts_host)
        return most if window is None else min(most, window)

    def _write_chunk(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's chunk K/V in the producer's cache (only what later queries need)."""
        cache = self.cache
        kind, ck, cv = cache.kv[layer]
        if kind == "ring":
            # rows a later token of the same chunk overwrites in the ring go to the scratch slot
            keep = self.row_m >= (self.start + self.lens)[self.row_b] - cache.ring_size
            s = self.slot_idx[self.row_b].where(keep, torch.full_like(self.row_b, cache.scratch_slot))
            m = self.row_m % cache.ring_size
            ck[s, m], cv[s, m] = k, v
        else:
            bs = cache.shape.block_size
            blk = cache.block_table[self.slot_idx[self.row_b], self.row_m // bs].long()
            ck[blk, self.row_m % bs], cv[blk, self.row_m % bs] = k, v

    def attention(self, layer, q, k, v):
        cfg = self.cfg
        p = cfg.kv_producer[layer]
        if k is not None:
            self.kv[layer] = (k, v)
        k, v = self.kv[p]
        kind, ck, cv = self.cache.kv[p]
        window = None if cfg.is_global(p) else cfg.sliding_window
        out = attention_prefill(q, k, v, self.cache.meta_k[p], self.cache.meta_v[p], ck, cv, self.slot_idx,
                                self.start, self.cu, window,
                                self.cache.block_table if kind == "paged" else None,
                                max_chunk=self.Lmax, max_hist=self._max_hist(window))
        if layer == self.cache.last_reader[p]:  # history of later chunks: written once nobody reads it here
            self._write_chunk(p, k, v)
            del self.kv[p]
        return out

    def conv(self, layer, s, weight, bias):
        return causal_conv1d_varlen(s, weight, bias, self.cu, self.cache.conv[layer], self.slot_idx)

    def scan(self, layer, u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_varlen(u, delta, A, B, C, D, z, delta_bias, self.cu,
                                     self.cache.ssm[layer], self.slot_idx)


class DecodeOps:
    """One token per sequence at real position ``pos[b]`` (= tokens already cached)."""

    def __init__(self, cache: KVCache, slot_idx: torch.Tensor, pos: torch.Tensor):
        cfg = cache.cfg
        self.cache, self.cfg = cache, cfg
        self.slot_idx, self.pos = slot_idx, pos
        self.ctx_len = pos + 1
        self.cos, self.sin = rope_cos_sin(cfg, pos + cfg.num_memory_tokens, cache.shape.dtype)

    def attention(self, layer, q, k, v):
        cfg, cache = self.cfg, self.cache
        p = cfg.kv_producer[layer]
        kind, ck, cv = cache.kv[p]
        if k is not None:  # producer: write the current token first, then attend from the cache
            if kind == "ring":
                m = self.pos % cache.ring_size
                ck[self.slot_idx, m], cv[self.slot_idx, m] = k, v
            else:
                bs = cache.shape.block_size
                blk = cache.block_table[self.slot_idx, self.pos // bs].long()
                ck[blk, self.pos % bs], cv[blk, self.pos % bs] = k, v
        window = None if cfg.is_global(layer) else cfg.sliding_window
        table = cache.block_table if kind == "paged" else None
        return attention_decode(q, cache.meta_k[p], cache.meta_v[p], ck, cv, self.slot_idx,
                                self.ctx_len, window, table)

    def conv(self, layer, s, weight, bias):
        return causal_conv1d_update(s, weight, bias, self.cache.conv[layer], self.slot_idx)

    def scan(self, layer, u, delta, A, B, C, D, z, delta_bias):
        return selective_state_update(self.cache.ssm[layer], self.slot_idx, u, delta, A, B, C, D, z, delta_bias)


class ModelRunner:
    """Owns the model and the cache; turns token ids into next-token logits."""

    def __init__(self, model: HymbaForCausalLM, cache: KVCache, cuda_graphs: bool = False):
        self.model, self.cache = model, cache
        self.graphs = DecodeGraphs(self) if cuda_graphs and model.device.type == "cuda" else None

    @torch.inference_mode()
    def prefill(self, slots: list[int], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Run chunks (token ids per sequence, continuing at ``starts``); logits [B, V] of each
        chunk's last token."""
        ops = PrefillOps(self.cache, slots, starts, [len(c) for c in chunks])
        ids = to_device([t for c in chunks for t in c], torch.long, self.model.device)
        h = self.model.run_layers(self.model.model.embed_tokens(ids), ops)
        return self.model.head(h[ops.last_rows])

    @torch.inference_mode()
    def decode(self, slot_idx: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence: ids [B] at positions pos [B] in slots slot_idx -> logits [B, V]."""
        if self.graphs is not None and ids.shape[0] <= self.graphs.max_batch:
            return self.graphs.run(slot_idx, pos, ids)
        return self._decode_eager(slot_idx, pos, ids)

    def _decode_eager(self, slot_idx: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ops = DecodeOps(self.cache, slot_idx, pos)
        return self.model.head(self.model.run_layers(self.model.model.embed_tokens(ids), ops))


def decode_bucket(b: int, max_batch: int) -> int:
    """The CUDA-graph batch size a decode of ``b`` sequences runs at: powers of two, then
    multiples of 256, at most ``max_batch``."""
    if b <= 256:
        return min(1 << (b - 1).bit_length(), max_batch)
    return min(-(-b // 256) * 256, max_batch)


def decode_buckets(max_batch: int) -> list[int]:
    """Every CUDA-graph batch size of an engine whose decode holds at most ``max_batch``."""
    return sorted({decode_bucket(b, max_batch) for b in range(1, max_batch + 1)})


class DecodeGraphs:
    """Decode under CUDA graphs, one per batch-size bucket (powers of two, then multiples of 256).

    A batch is padded up to its bucket with lanes that point at the cache's scratch slot (and
    scratch block), so padding writes only where no sequence reads. Captured lazily, on first use.
    """

    def __init__(self, runner: "ModelRunner"):
        self.runner = runner
        cache = runner.cache
        self.max_batch = cache.shape.num_slots - 1
        dev = runner.model.device
        n = self.max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot = torch.full((n,), cache.scratch_slot, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, b: int) -> int:
        return decode_bucket(b, self.max_batch)

    def capture_all(self) -> None:
        """Capture every bucket now (a benchmark's warm-up), not at its first use."""
        for size in decode_buckets(self.max_batch):
            if size not in self.graphs:
                self._capture(size)

    def _capture(self, size: int) -> None:
        """Warm-up and capture run the step: only on scratch lanes."""
        r = self.runner
        self.slot[:size].fill_(r.cache.scratch_slot)
        self.pos[:size].zero_()
        args = (self.slot[:size], self.pos[:size], self.ids[:size])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            r._decode_eager(*args)  # warm-up: kernel compilation and autotuning happen here
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = r._decode_eager(*args)
        self.pool = g.pool()
        self.graphs[size] = (g, out)

    def run(self, slot_idx: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        size = self.bucket(b)
        scratch = self.runner.cache.scratch_slot
        if size not in self.graphs:
            self._capture(size)
        self.ids[:b].copy_(ids)
        self.slot[:b].copy_(slot_idx)
        self.pos[:b].copy_(pos)
        self.slot[b:size].fill_(scratch)
        self.pos[b:size].zero_()
        g, out = self.graphs[size]
        g.replay()
        return out[:b].clone()  # the static buffer is overwritten by the next replay
