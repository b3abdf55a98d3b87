"""The engine's cache: one spec per kind (design.md §3, hymba-architecture.md §6).

- meta: the 128 meta tokens' K/V for every producer layer and their conv/SSM states, computed
  once per model and shared read-only (never copied per request);
- sliding-window producers: K/V in a fixed per-slot ring of ``window + 1`` entries (the current
  token is written before it attends, so a query sees itself and the ``window`` tokens before);
- global producers: K/V in paged blocks (one block table per slot, shared by those layers);
- conv + SSM state: one fixed slot per sequence (SSM state in the model's dtype by default, as
  NVIDIA's cache stores it; the scan reads it into fp32 and rounds it back);
- consumer layers store nothing.

Owns allocation of slots and blocks and the exact byte count (checked against costs.py).

Forking (design.md §3): ``fork(src, dst, length)`` starts slot ``dst`` from the state of slot
``src`` after its first ``length`` tokens: the fixed-size parts (conv + SSM state, the
sliding-window rings) are copied, the global layers' full blocks are shared by reference count,
and a partly filled last block is copied (the fork writes its next tokens there). A block goes
back to the free list when its last holder frees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import HymbaConfig
from ..costs import cache_bytes
from ..hymba import FullSequenceOps, HymbaForCausalLM
from .transfer import to_device


@dataclass(frozen=True)
class CacheShape:
    num_slots: int
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    ssm_dtype: torch.dtype


def plan_cache(cfg: HymbaConfig, budget_bytes: int, max_num_seqs: int, block_size: int,
               dtype: torch.dtype, ssm_dtype: torch.dtype, expected_context: int = 2048) -> CacheShape:
    """Slots and blocks that fit ``budget_bytes``, sized for ``expected_context`` tokens a sequence."""
    cb = cache_bytes(cfg, _bytes(dtype), _bytes(ssm_dtype))
    block = cb.per_global_token * block_size
    slot = cb.slot + 4 * -(-cfg.max_position_embeddings // block_size)  # + its block-table row
    blocks_per_seq = -(-expected_context // block_size)
    per_seq = slot + block * blocks_per_seq
    slots = min(max_num_seqs, max(1, (budget_bytes - cb.meta) // per_seq - 1)) + 1  # + scratch
    blocks = max(blocks_per_seq + 1, (budget_bytes - cb.meta - slots * slot) // max(block, 1))
    if cb.meta + slots * slot + blocks * block > budget_bytes:
        raise MemoryError(f"cache budget of {budget_bytes} bytes cannot hold one sequence "
                          f"({cb.meta + cb.slot + block * blocks_per_seq} bytes needed)")
    return CacheShape(slots, int(blocks), block_size, dtype, ssm_dtype)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class KVCache:
    """All cache tensors of one engine, and the slot / block free lists."""

    def __init__(self, model: HymbaForCausalLM, shape: CacheShape):
        cfg = model.config
        self.cfg, self.shape = cfg, shape
        dev, dt = model.device, shape.dtype
        S, n, E = shape.num_slots, cfg.num_hidden_layers, cfg.d_inner
        nkv, d, dv = cfg.num_key_value_heads, cfg.head_dim, cfg.v_head_dim
        self.ring_size = cfg.sliding_window + 1
        self.conv = torch.zeros(n, S, E, cfg.mamba_d_conv - 1, dtype=dt, device=dev)
        self.ssm = torch.zeros(n, S, E, cfg.mamba_d_state, dtype=shape.ssm_dtype, device=dev)
        # producer layer -> (kind, k tensor, v tensor); consumers look up their producer
        self.kv: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        for p in cfg.producers:
            if cfg.is_global(p):
                k = torch.zeros(shape.num_blocks, shape.block_size, nkv, d, dtype=dt, device=dev)
                v = torch.zeros(shape.num_blocks, shape.block_size, nkv, dv, dtype=dt, device=dev)
                self.kv[p] = ("paged", k, v)
            else:
                k = torch.zeros(S, self.ring_size, nkv, d, dtype=dt, device=dev)
                v = torch.zeros(S, self.ring_size, nkv, dv, dtype=dt, device=dev)
                self.kv[p] = ("ring", k, v)
        # the last layer reading each producer's K/V (a prefill chunk enters the cache after it)
        self.last_reader = {p: max(l for l, q in enumerate(cfg.kv_producer) if q == p) for p in cfg.producers}
        self.max_blocks_per_seq = -(-(cfg.max_position_embeddings) // shape.block_size)
        self.block_table = torch.zeros(S, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._compute_meta(model)
        self.free_slots = list(range(S - 1, -1, -1))
        self.free_blocks = list(range(shape.num_blocks - 1, -1, -1))
        self.blocks_of: dict[int, list[int]] = {}
        self.refs = [0] * shape.num_blocks  # holders of each block (slots; forks share full blocks)
        self._fork_slots: list[tuple[int, int]] = []   # (src, dst) slot copies queued by fork
        self._fork_blocks: list[tuple[int, int]] = []  # (src, dst) partly filled block copies
        self._deferred_free: list[int] = []  # slots freed while a queued fork reads them
        self._fork_len = 0  # longest queued fork (ring entries to copy)
        # scratch: where padded lanes of a CUDA-graph decode write (never read by a sequence)
        self.scratch_slot = self.free_slots.pop(0)
        self.scratch_block = self.free_blocks.pop(0)
        self.refs[self.scratch_block] = 1
        self.block_table[self.scratch_slot] = self.scratch_block

    # ---- meta tokens: once per model -----------------------------------------------------
    @torch.inference_mode()
    def _compute_meta(self, model: HymbaForCausalLM) -> None:
        cfg = self.cfg
        M = cfg.num_memory_tokens
        ops = FullSequenceOps(model, M)
        if M:
            model.run_layers(model.model.memory_tokens.to(self.shape.dtype), ops)
        self.meta_k, self.meta_v = {}, {}
        nkv = cfg.num_key_value_heads
        for p in cfg.producers:
            k, v = ops.kv.get(p, (torch.zeros(0, nkv, cfg.head_dim, device=model.device),
                                  torch.zeros(0, nkv, cfg.v_head_dim, device=model.device)))
            self.meta_k[p] = k.to(self.shape.dtype, copy=True).contiguous()
            self.meta_v[p] = v.to(self.shape.dtype, copy=True).contiguous()
        self.meta_conv = ops.conv_state[:, 0].to(self.shape.dtype).clone()   # [n, E, K-1]
        self.meta_ssm = ops.ssm_state[:, 0].float().clone()                 # [n, E, N] fp32

    # ---- slots and blocks ----------------------------------------------------------------
    def allocate_slot(self) -> int | None:
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        self.conv[:, slot] = self.meta_conv
        self.ssm[:, slot] = self.meta_ssm.to(self.shape.ssm_dtype)
        self.blocks_of[slot] = []
        return slot

    def reserve_blocks(self, slot: int, num_tokens: int) -> bool:
        """Make the slot's block table cover ``num_tokens`` real tokens; False if out of blocks."""
        have = self.blocks_of[slot]
        need = -(-num_tokens // self.shape.block_size) - len(have)
        if need <= 0:
            return True
        if need > len(self.free_blocks) or len(have) + need > self.max_blocks_per_seq:
            return False
        new = [self.free_blocks.pop() for _ in range(need)]
        for b in new:
            self.refs[b] = 1
        self.block_table[slot, len(have):len(have) + need] = to_device(new, torch.int32, self.block_table.device)
        have.extend(new)
        return True

    def free(self, slot: int) -> None:
        if any(s == slot for s, _ in self._fork_slots):  # a queued fork still reads it
            self._deferred_free.append(slot)
            return
        self._fork_slots = [(s, d) for s, d in self._fork_slots if d != slot]
        freed = []
        for b in reversed(self.blocks_of.pop(slot)):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)
                freed.append(b)
        if freed and self._fork_blocks:
            self._fork_blocks = [(s, d) for s, d in self._fork_blocks if d not in freed]
        self.free_slots.append(slot)

    def fork(self, src: int, dst: int, length: int) -> bool:
        """Make the freshly allocated slot ``dst`` continue from slot ``src`` after its first
        ``length`` tokens (``src`` must not write below ``length`` while forks live). False,
        changing nothing, when no block is free for a partly filled last block. The block tables
        change now; the state copies are queued for ``apply_forks`` (one batched copy a step)."""
        bs = self.shape.block_size
        full, partial = divmod(length, bs)
        src_blocks = self.blocks_of[src]
        if len(src_blocks) < full + (partial > 0):
            raise ValueError(f"slot {src} holds {len(src_blocks)} blocks, not {length} tokens")
        if partial and not self.free_blocks:
            return False
        assert not self.blocks_of[dst], "fork into a slot that already holds blocks"
        blocks = src_blocks[:full]
        for b in blocks:
            self.refs[b] += 1
        if partial:
            b = self.free_blocks.pop()
            self.refs[b] = 1
            self._fork_blocks.append((src_blocks[full], b))
            blocks = blocks + [b]
        self._fork_slots.append((src, dst))
        self._fork_len = max(self._fork_len, length)
        if blocks:
            self.block_table[dst, :len(blocks)] = to_device(blocks, torch.int32, self.block_table.device)
        self.blocks_of[dst] = list(blocks)
        return True

    def apply_forks(self) -> None:
        """Copy the queued forks' state: conv + SSM slots, rings, partly filled last blocks."""
        if self._fork_slots:
            dev = self.conv.device
            src, dst = to_device(list(zip(*self._fork_slots)), torch.long, dev)
            self.conv[:, dst] = self.conv[:, src]
            self.ssm[:, dst] = self.ssm[:, src]
            n = min(self._fork_len, self.ring_size)  # ring entries written so far (positions mod ring)
            for kind, k, v in self.kv.values():
                if kind == "ring":
                    k[dst, :n], v[dst, :n] = k[src, :n], v[src, :n]
        if self._fork_blocks:
            src, dst = to_device(list(zip(*self._fork_blocks)), torch.long, self.conv.device)
            for kind, k, v in self.kv.values():
                if kind == "paged":  # whole blocks: entries past the prefix are never read before written
                    k[dst], v[dst] = k[src], v[src]
        self._fork_slots, self._fork_blocks, self._fork_len = [], [], 0
        deferred, self._deferred_free = self._deferred_free, []
        for slot in deferred:
            self.free(slot)

    @property
    def has_global_layers(self) -> bool:
        return any(kind == "paged" for kind, _, _ in self.kv.values())

    def nbytes(self) -> int:
        """Bytes this cache holds on the device (slots, rings, blocks, meta, block table)."""
        tensors = [self.conv, self.ssm, self.block_table, self.meta_conv, self.meta_ssm]
        tensors += [t for _, k, v in self.kv.values() for t in (k, v)]
        tensors += list(self.meta_k.values()) + list(self.meta_v.values())
        return sum(t.numel() * t.element_size() for t in tensors)
