"""Long documents (``task.long_input: map_reduce``, issue 14 item 6): a row whose prompt does
not fit the token limit is not truncated but summarized in pieces.

Its text is cut into chunks whose prompts fit (at paragraph boundaries, else sentence, else
word, else character boundaries), each chunk goes through the job's own prompt (instruction,
template, chat format) with the chunk in place of the text, and the joined chunk results become
the row's text for the next round, until the prompt fits; then the row gets one final result.
The row's ``chunks`` is how many pieces its text was cut into first (1 when it fitted). Rounds
batch every row's requests (chunks of long rows and final prompts of the others) into one
generate call each. A row that still does not fit after ``MAX_ROUNDS`` (chunk results as long
as the chunks) falls back to the job's truncation. Everything happens inside one work unit, so
each input row still gets exactly one output row. Knows nothing of models or files.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from .prompts import Prompt, PromptBuilder, _row_error, sample_seed

if TYPE_CHECKING:
    from .unit import GenerateFn, Generation

MAX_ROUNDS = 6
MIN_CHUNK_TOKENS = 16
JOINER = "\n\n"
_BOUNDARIES = (r"\n\s*\n", r"(?<=[.!?])\s+", r"\s+")  # paragraph, sentence, word


def split_text(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """Cut ``text`` into consecutive chunks of at most ``budget`` tokens (by ``count``), at the
    coarsest boundaries that allow it; whitespace at chunk edges is dropped."""
    pieces = _pieces(text, budget, count, 0)
    chunks, cur = [], ""
    for p in pieces:
        if cur and count(cur + p) > budget:
            chunks.append(cur)
            cur = p
        else:
            cur += p
    chunks.append(cur)
    return [c.strip() for c in chunks if c.strip()]


def _pieces(text: str, budget: int, count: Callable[[str], int], level: int) -> list[str]:
    if count(text) <= budget:
        return [text]
    if level == len(_BOUNDARIES):  # one unbroken run longer than a chunk: cut by characters
        k = max(1, len(text) * budget // (2 * count(text)))
        return [text[:k]] + _pieces(text[k:], budget, count, level)
    parts = re.split(f"({_BOUNDARIES[level]})", text)
    out: list[str] = []
    for i in range(0, len(parts), 2):  # content, then the separator that followed it
        piece = parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")
        if piece:
            out += _pieces(piece, budget, count, level + 1)
    return out


class MapReduce:
    """Prompts and generations for a unit's rows under ``long_input: map_reduce``."""

    def __init__(self, builder: PromptBuilder, generate: GenerateFn) -> None:
        if builder.cfg.text_column is None:
            raise ValueError("task.long_input: map_reduce needs input.text_column (the text to cut)")
        self.b, self.generate = builder, generate

    def run(self, rows: list[dict[str, Any]], seeds: list[int]
            ) -> tuple[list[Prompt], list[Generation | None], list[int | None]]:
        """(each row's final prompt or error, its final generation, its chunk count), in row order."""
        n = len(rows)
        prompts: list[Prompt] = [Prompt(None) for _ in range(n)]
        gens: list[Generation | None] = [None] * n
        chunks: list[int | None] = [None] * n
        text: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                text[i] = self.b.body(row)
            except Exception as e:  # noqa: BLE001 - one row's problem is that row's error
                prompts[i] = Prompt(None, error=_row_error(e))
        for rnd in range(MAX_ROUNDS + 1):
            if not text:
                break
            reqs: list[tuple[int, bool, list[int]]] = []  # (row, final?, prompt ids)
            for i, body in list(text.items()):
                try:
                    self._plan(i, rows[i], body, rnd, reqs, prompts, chunks)
                except Exception as e:  # noqa: BLE001
                    prompts[i] = Prompt(None, error=_row_error(e))
                    del text[i]
            reqs = [r for r in reqs if r[0] in text]
            if not reqs:
                break
            outs = self.generate([ids for _, _, ids in reqs],
                                 [sample_seed(seeds[i], 0 if final else 1 + rnd * 1000 + k)
                                  for k, (i, final, _) in enumerate(reqs)])
            if len(outs) != len(reqs):
                raise RuntimeError(f"generate returned {len(outs)} outputs for {len(reqs)} prompts")
            parts: dict[int, list[str]] = {}
            for (i, final, ids), g in zip(reqs, outs):
                if i not in text:
                    continue
                if final:
                    gens[i] = g
                    del text[i]
                elif g.error is not None:
                    prompts[i] = Prompt(None, error=f"chunk of the text: {g.error}")
                    del text[i]
                else:
                    parts.setdefault(i, []).append(self.b.codec.decode(g.token_ids).strip())
            for i, texts in parts.items():
                if i in text:
                    text[i] = JOINER.join(texts)
        return prompts, gens, chunks

    def _plan(self, i: int, row: dict[str, Any], body: str, rnd: int, reqs: list, prompts: list[Prompt],
              chunks: list[int | None]) -> None:
        b = self.b
        ids = b.encode(row, body)
        if len(ids) <= b.limit or rnd == MAX_ROUNDS:
            prompts[i] = Prompt(ids) if len(ids) <= b.limit else b.fit(row, body, len(ids))
            if prompts[i].token_ids is not None:
                reqs.append((i, True, prompts[i].token_ids))
            if chunks[i] is None:
                chunks[i] = 1
            return
        budget = b.limit - len(b.encode(row, "")) - 4  # the prompt around the text, and a margin
        if budget < MIN_CHUNK_TOKENS:
            raise ValueError(f"the prompt without its text is {b.limit - budget - 4} tokens: no room for a "
                             f"chunk of the text within the limit of {b.limit} (task.long_input map_reduce)")
        pieces = split_text(body, budget, lambda t: len(b.codec.encode_fragment(t)))
        if chunks[i] is None:
            chunks[i] = len(pieces)
        for p in pieces:
            pids = b.encode(row, p)
            prompt = Prompt(pids) if len(pids) <= b.limit else b.fit(row, p, len(pids))
            if prompt.token_ids is None:
                raise ValueError(prompt.error or "a chunk does not fit")
            reqs.append((i, False, prompt.token_ids))
