"""The per-request logits hook of the engine's sampling step: everything a request may ask to
change about its next-token distribution before sampling, applied on the device to that
request's row of the batch's logits, in this order:

1. repetition / presence / frequency penalties, from per-request token statistics kept on the
   device (a row of ``counts`` / ``seen`` per penalized request, updated from the sampled token
   tensor after each step: no host sync);
2. ``min_new_tokens``: EOS and the request's stop tokens get -inf until enough are generated;
3. a decoding constraint's token mask (constraints.py): filled on the host per request (while
   the device is still running the step's forward), copied to the device, applied there.

Requests that ask for none of this cost nothing: ``process`` returns the logits untouched. It
also keeps the raw logits' log-probabilities for requests that want them (the model's own
distribution, before penalties, masks and temperature). Knows nothing of text or grammars.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..sampling import apply_penalties, apply_token_bitmask, token_logprobs
from .constraints import bitmask_words, fill_rows
from .transfer import to_device

if TYPE_CHECKING:
    from .scheduler import Sequence


class PenaltyState:
    """Per-request token statistics on the device: ``counts`` [rows, V] fp32 (occurrences in the
    output) and ``seen`` [rows, V] bool (in the prompt or the output); rows grow by doubling and
    are reused when their request finishes."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(0, vocab, device=device)
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.row_of: dict[int, int] = {}
        self.free: list[int] = []

    def rows(self, seqs: list["Sequence"]) -> list[int]:
        """The row of each sequence, made on its first use from its prompt (and output so far)."""
        out = []
        for s in seqs:
            r = self.row_of.get(s.request_id)
            if r is None:
                r = self._new_row()
                self.row_of[s.request_id] = r
                self.counts[r].zero_()
                self.seen[r].zero_()
                self.seen[r, to_device(s.tokens, torch.long, self.device)] = True
                if s.output:
                    self.counts[r].index_add_(0, to_device(s.output, torch.long, self.device),
                                              torch.ones(len(s.output), device=self.device))
            out.append(r)
        return out

    def _new_row(self) -> int:
        if not self.free:
            old = self.counts.shape[0]
            new = max(8, 2 * old)
            self.counts = torch.cat([self.counts, torch.zeros(new - old, self.vocab, device=self.device)])
            self.seen = torch.cat([self.seen, torch.zeros(new - old, self.vocab, dtype=torch.bool, device=self.device)])
            self.free = list(range(new - 1, old - 1, -1))
        return self.free.pop()

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The sampled ``tokens`` (device) of the sequences in ``rows`` (device)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
        self.seen[rows, tokens] = True

    def release(self, request_id: int) -> None:
        r = self.row_of.pop(request_id, None)
        if r is not None:
            self.free.append(r)


class LogitsProcessor:
    """Applies each request's penalties, min-token rule and constraint mask to its logits row."""

    def __init__(self, vocab: int, eos: int, device: torch.device):
        self.vocab, self.eos, self.device = vocab, eos, device
        self.words = bitmask_words(vocab)
        self.penalties = PenaltyState(vocab, device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, batch idx) to record
        self.stats = {"constraint_fill_s": 0.0, "constraint_advance_s": 0.0}  # host time, for benchmarks

    def _host_rows(self, n: int) -> torch.Tensor:
        """Rows for this step's masks: fresh pinned memory on CUDA (the copy to the device may run
        after the host has moved on to the next step; PyTorch's caching host allocator keeps a
        block until the copy that reads it has run), plain memory elsewhere."""
        return torch.empty(n, self.words, dtype=torch.int32, pin_memory=self.device.type == "cuda")

    @staticmethod
    def passthrough(seq: "Sequence", ahead: int = 0) -> bool:
        """``process`` leaves this sequence's row untouched ``ahead`` tokens from now (what it
        needs is known without the tokens in between)."""
        p, c = seq.params, seq.params.constraint
        return (not (c is not None and c.masks) and not p.penalized
                and (p.ignore_eos or len(seq.output) + ahead >= p.min_new_tokens))

    def process(self, seqs: list["Sequence"], logits: torch.Tensor) -> torch.Tensor:
        """The logits to sample from (the same tensor when no request asks for anything).

        The constraints' masks are filled on the host first, before anything here waits on the
        device (a copy of host data to the device waits for the step's forward): so the host
        fills them while the device is still running the forward."""
        dev = logits.device
        self._pending = None
        con = [i for i, s in enumerate(seqs) if s.params.constraint is not None and s.params.constraint.masks]
        host = None
        if con:
            t0 = time.perf_counter()
            host = self._host_rows(len(con))
            fill_rows([seqs[i].params.constraint for i in con], host.numpy())
            self.stats["constraint_fill_s"] += time.perf_counter() - t0
        pen = [i for i, s in enumerate(seqs) if s.params.penalized]
        r_min, c_min = [], []
        for i, s in enumerate(seqs):
            p = s.params
            if len(s.output) < p.min_new_tokens and not p.ignore_eos:
                stops = sorted({self.eos, *p.stop_token_ids})
                r_min += [i] * len(stops)
                c_min += stops
        if not (con or pen or r_min):
            return logits
        logits = logits.clone()
        if pen:
            rows = self.penalties.rows([seqs[i] for i in pen])
            idx, rows_t = to_device([pen, rows], torch.long, dev)
            ps = [seqs[i].params for i in pen]
            rep, pres, freq = to_device([[p.repetition_penalty for p in ps], [p.presence_penalty for p in ps],
                                         [p.frequency_penalty for p in ps]], torch.float32, dev)
            logits[idx] = apply_penalties(logits[idx], self.penalties.counts[rows_t], self.penalties.seen[rows_t],
                                          rep, pres, freq)
            self._pending = (rows_t, idx)
        if r_min:
            r_t, c_t = to_device([r_min, c_min], torch.long, dev)
            logits[r_t, c_t] = float("-inf")
        if con:
            assert host is not None
            mask = host.to(dev, non_blocking=True)
            idx = to_device(con, torch.long, dev)
            logits[idx] = apply_token_bitmask(logits[idx], mask)
        return logits

    @staticmethod
    def logprobs(seqs: list["Sequence"], raw: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Log-probabilities of ``tokens`` under the raw logits (all rows), when any request wants them."""
        if not any(s.params.logprobs for s in seqs):
            return None
        return token_logprobs(raw, tokens)

    def record(self, tokens: torch.Tensor) -> None:
        """After sampling: the penalized requests' new tokens into their statistics (device)."""
        if self._pending is not None:
            rows, idx = self._pending
            self.penalties.record(rows, tokens[idx])
            self._pending = None

    def release(self, request_id: int) -> None:
        """A request finished: free its statistics row."""
        self.penalties.release(request_id)

