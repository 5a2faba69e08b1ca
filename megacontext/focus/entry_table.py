"""A per-history table of LensNet's entry features, so a focus round reads only the entries it has not seen.

LensNet's input for a working-context entry depends only on what the entry holds: an LOD0 block's
norm-rescaled mean token embedding, or a gist's vector (:func:`megacontext.focus.lens.entry_vectors_from_source`).
Both are fixed once the block is complete, because a history only grows. Successive focus rounds of one read
(one per 32 tokens, plus the settle and prompt rounds) tile nearly the same entries, so recomputing every
entry's feature each round re-reads the store, re-embeds every raw block and copies everything to the device
again (about 190 tensor ops and 10 host syncs per round at ~600 entries; what limits a round on a GPU is
this dispatch, not arithmetic). :class:`EntryTable` keeps the features already computed in one device tensor,
addressed by ``(level, index)``, and computes only the missing rows with the same function; a round then
costs one gather plus the work on the few new entries (new blocks, fresh collapses and expansions).

Invariants
- A row holds exactly what :func:`entry_vectors_from_source` gave for that entry (computed by it, on a subset
  of the entries; on the CPU this is bit-identical to the full batch: tested).
- The table belongs to one history object (held by a weak reference) whose length never shrank; another
  object, a shorter history or a different base resets it, so no stale row is ever read.
- The entry levels and indices stay on the CPU for the bookkeeping (the engine's WC lives there); only the
  features and one gather index go to the device, so the lookup itself needs no device sync.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

_MIN_ROWS = 256  # smallest region reserved for a level



class EntryTable:
    """Features [E, d] of WC entries, cached per ``(level, index)`` for one history (see module docstring).

    ``compute(source, levels, indices) -> [n, d]`` is the reference feature function (run on the missing entries
    only)."""

    def __init__(self, compute: Callable[[object, Tensor, Tensor], Tensor], d_model: int, device: torch.device):
        self.compute, self.d, self.device = compute, d_model, device
        self._owner: weakref.ref | None = None
        self._num_tokens = 0
        self.reset()

    def reset(self) -> None:
        self._rows = torch.zeros(0, self.d, device=self.device)  # [R, d] float32
        self._valid = torch.zeros(0, dtype=torch.bool)  # [R] CPU: which rows hold a feature
        self._start = torch.zeros(1, dtype=torch.long)  # [L] first row of each level's region
        self._cap: list[int] = [0]  # rows reserved per level
        self.hits = self.misses = 0  # entries read from the table / computed, since the last reset

    def _bind(self, source) -> None:
        """Reset unless ``source`` is the history the table was built from and it did not shrink."""
        n = int(source.num_tokens)
        owner = self._owner() if self._owner is not None else None
        if owner is not source or n < self._num_tokens:
            self.reset()
            try:
                self._owner = weakref.ref(source)
            except TypeError:  # a source that takes no weak reference: never cached across calls
                self._owner = None
        self._num_tokens = n

    def _reserve(self, levels: Tensor, indices: Tensor) -> None:
        """Grow the level regions (to powers of two, so growth is rare) until every entry has a row."""
        top = int(levels.max())
        n_lv = max(len(self._cap), top + 1)
        need = torch.zeros(top + 1, dtype=torch.long).scatter_reduce(0, levels, indices + 1, "amax").tolist()
        need += [0] * (n_lv - len(need))
        cap = self._cap + [0] * (n_lv - len(self._cap))
        if all(nd <= c for nd, c in zip(need, cap, strict=True)):
            return
        new_cap = [c if nd <= c else max(_MIN_ROWS, 1 << (nd - 1).bit_length())
                   for nd, c in zip(need, cap, strict=True)]
        new_start = torch.tensor([0, *new_cap[:-1]]).cumsum(0)  # [L]
        rows = torch.zeros(sum(new_cap), self.d, device=self.device)
        valid = torch.zeros(sum(new_cap), dtype=torch.bool)
        for lv, c in enumerate(self._cap):  # move each old region to its new place (one per level: a handful)
            if c:
                dst, src = int(new_start[lv]), int(self._start[lv])
                rows[dst:dst + c] = self._rows[src:src + c]
                valid[dst:dst + c] = self._valid[src:src + c]
        self._rows, self._valid, self._start, self._cap = rows, valid, new_start, new_cap

    def get(self, source, levels: Tensor, indices: Tensor) -> Tensor:
        """Features [E, d] (float32, on the table's device) of entries ``(levels, indices)`` of ``source``."""
        self._bind(source)
        if levels.numel() == 0:
            return torch.zeros(0, self.d, device=self.device)
        lv, ix = levels.cpu().long(), indices.cpu().long()
        self._reserve(lv, ix)
        row = self._start[lv] + ix  # [E] CPU
        miss = (~self._valid[row]).nonzero().flatten()  # [m] CPU
        n_miss = miss.numel()
        if n_miss:
            got = self.compute(source, lv[miss], ix[miss]).float().to(self.device)  # [m, d]
            dst = row[miss]
            self._rows.index_copy_(0, dst.to(self.device), got)
            self._valid[dst] = True
        self.misses += n_miss
        self.hits += lv.numel() - n_miss
        return self._rows.index_select(0, row.to(self.device))  # [E, d]

