"""A per-history table of LensNet's entry features, so a focus round computes only the entries it has not seen.

LensNet's input for a working-context entry depends only on what the entry holds: an LOD0 block's
norm-rescaled mean token embedding, or a gist's vector (:func:`megacontext.focus.lens.entry_vectors_from_source`).
Both are fixed once the block is complete, because a history only grows. Successive focus rounds of one read
(one per 32 tokens, plus the settle and prompt rounds) tile nearly the same entries (typically 98% of them
repeat), so recomputing every entry's feature each round re-reads the store, re-embeds every raw block and
copies everything to the device again (about 190 tensor ops per round at ~600 entries; on a GPU a round is
bound by such dispatch, not by arithmetic). :class:`EntryTable` keeps the features already computed in one
device tensor and computes only the missing rows with the same function; a round then costs one lookup and
one gather plus the work on the few new entries (new blocks, fresh collapses and expansions).

Layout: ``keys [R]`` (``level * 2^40 + index``, sorted, CPU) with the row of each key ``slots [R]`` (CPU), and the
rows ``[capacity, d]`` on the device. A lookup is one ``searchsorted``; new rows are appended. Memory stays
bounded: when the rows would pass ``max(min_rows, rows_per_entry * E)``, the table is compacted to the rows of
the current call's entries.

Invariants
- A row holds exactly what :func:`entry_vectors_from_source` gave for that entry (computed by it, on a subset
  of the entries; on the CPU this is bit-identical to the full batch: tested).
- The table belongs to one history object (held by a weak reference) whose length never shrank; another
  object or a shorter history resets it, so no stale row is ever read.
- The bookkeeping stays on the CPU (where the engine's WC lives); only the features and one gather index go to
  the device, so a lookup needs no device sync.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

_LEVEL_KEY = 1 << 40  # key of an entry: level * 2^40 + index (indices stay far below 2^40)


class EntryTable:
    """Features [E, d] of WC entries, cached per ``(level, index)`` for one history (see module docstring).

    ``compute(source, levels, indices) -> [n, d]`` is the reference feature function (run on the missing entries
    only)."""

    def __init__(self, compute: Callable[[object, Tensor, Tensor], Tensor], d_model: int, device: torch.device,
                 min_rows: int = 4096, rows_per_entry: int = 4):
        if min_rows < 1 or rows_per_entry < 1:
            raise ValueError(f"min_rows={min_rows} and rows_per_entry={rows_per_entry} must be >= 1")
        self.compute, self.d, self.device = compute, d_model, torch.device(device)
        self.min_rows, self.rows_per_entry = min_rows, rows_per_entry
        self._owner: weakref.ref | None = None
        self._num_tokens = 0
        self.reset()

    def reset(self) -> None:
        self._keys = torch.zeros(0, dtype=torch.long)  # [R] sorted
        self._slots = torch.zeros(0, dtype=torch.long)  # [R] row of each key
        self._rows = torch.zeros(0, self.d, device=self.device)  # [capacity, d] float32
        self._used = 0  # rows [0, used) are filled
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

    def _lookup(self, key: Tensor) -> Tensor:
        """Row of each key [E] (CPU), -1 where the table has none."""
        r = self._keys.shape[0]
        if r == 0:
            return torch.full_like(key, -1)
        pos = torch.searchsorted(self._keys, key).clamp(max=r - 1)
        return torch.where(self._keys[pos] == key, self._slots[pos], -1)

    def _store(self, keys: Tensor, rows: Tensor) -> Tensor:
        """Append ``rows`` [m, d] (device) under unique ``keys`` [m]; returns their rows [m] (CPU)."""
        m = keys.shape[0]
        need = self._used + m
        if need > self._rows.shape[0]:  # grow geometrically: amortised O(1) copies per row
            grown = torch.zeros(max(2 * self._rows.shape[0], need, 256), self.d, device=self.device)
            grown[:self._used] = self._rows[:self._used]
            self._rows = grown
        self._rows[self._used:need] = rows
        slots = torch.arange(self._used, need)
        self._used = need
        all_keys = torch.cat([self._keys, keys])
        order = torch.argsort(all_keys)
        self._keys, self._slots = all_keys[order], torch.cat([self._slots, slots])[order]
        return slots

    def _compact(self, keep_keys: Tensor, keep_rows: Tensor) -> Tensor:
        """Keep only rows ``keep_rows`` [h] (under ``keep_keys``); returns their new rows [h]."""
        kept = self._rows.index_select(0, keep_rows.to(self.device))  # [h, d]
        self._keys = torch.zeros(0, dtype=torch.long)
        self._slots = torch.zeros(0, dtype=torch.long)
        self._rows = torch.zeros(0, self.d, device=self.device)
        self._used = 0
        return self._store(keep_keys, kept) if keep_keys.numel() else keep_rows

    def get(self, source, levels: Tensor, indices: Tensor) -> Tensor:
        """Features [E, d] (float32, on the table's device) of entries ``(levels, indices)`` of ``source``."""
        self._bind(source)
        if levels.numel() == 0:
            return torch.zeros(0, self.d, device=self.device)
        lv, ix = levels.cpu().long(), indices.cpu().long()
        key = lv * _LEVEL_KEY + ix  # [E]
        row = self._lookup(key)  # [E] CPU, -1 = missing
        hit = row >= 0
        miss_keys, inverse = torch.unique(key[~hit], return_inverse=True)  # an entry set may repeat (not a tiling)
        m = miss_keys.shape[0]
        if m:
            if self._used + m > max(self.min_rows, self.rows_per_entry * key.shape[0]):
                hit_keys, first = torch.unique(key[hit], return_inverse=True)
                new = self._compact(hit_keys, torch.zeros_like(hit_keys).scatter_(0, first, row[hit]))
                row[hit] = new[first]
            got = self.compute(source, miss_keys // _LEVEL_KEY, miss_keys % _LEVEL_KEY).float().to(self.device)
            row[~hit] = self._store(miss_keys, got)[inverse]
        self.misses += m
        self.hits += int(hit.sum())
        return self._rows.index_select(0, row.to(self.device))  # [E, d]
