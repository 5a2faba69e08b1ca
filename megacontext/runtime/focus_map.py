"""Focus maps: the level of detail along the history, as written to telemetry and drawn by the viewer.

A WC tiling maps every 32-token block of the history to the level of the entry covering it. Stored as
run-length text, ``"<level>x<blocks>,..."`` (:func:`focus_runs`; e.g. ``"3x2,2x17,1x31,0x4"``), a map costs
bytes per run of equal levels, at most the WC's entry count, never the history length. Logs written before
carry ``lod_map`` strings (one character per block, :func:`lod_map`); :func:`row_runs` reads either. The
partial trailing block (tail tokens) counts as LOD0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, segment_ids, span_tensor


def block_levels(levels: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """(level [E'], blocks [E']) of a tiling's entries, plus one LOD0 block for a partial tail."""
    levels = levels.detach().to("cpu", torch.long)
    blocks = span_tensor(levels) // BLOCK  # [E]
    if num_tokens % BLOCK:
        levels = torch.cat([levels, levels.new_zeros(1)])
        blocks = torch.cat([blocks, blocks.new_ones(1)])
    return levels, blocks


def focus_runs(levels: Tensor, num_tokens: int) -> str:
    """Run-length focus map of a WC tiling: ``"<level>x<blocks>"`` per run of equal levels, comma-separated.

    levels [E] (entries in history order, tiling ``[0, covered)``); a partial tail counts as one LOD0 block.
    O(E), whatever the history length."""
    lv, nb = block_levels(levels, num_tokens)
    if lv.numel() == 0:
        return ""
    change = torch.ones_like(lv, dtype=torch.bool)
    change[1:] = lv[1:] != lv[:-1]
    starts = change.nonzero().flatten()  # [R]
    csum = torch.cat([nb.new_zeros(1), torch.cumsum(nb, 0)])
    ends = torch.cat([starts[1:], starts.new_tensor([lv.numel()])])
    lengths = csum[ends] - csum[starts]
    return ",".join(f"{a}x{b}" for a, b in zip(lv[starts].tolist(), lengths.tolist(), strict=True))


def decode_runs(runs: str) -> tuple[np.ndarray, np.ndarray]:
    """``focus_runs`` string -> (levels [R] int16, blocks [R] int64)."""
    if not runs:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    pairs = [p.split("x") for p in runs.split(",")]
    return np.array([int(a) for a, _ in pairs], np.int16), np.array([int(b) for _, b in pairs], np.int64)


def lod_map_runs(lods: str) -> tuple[np.ndarray, np.ndarray]:
    """An old-format ``lod_map`` (one character per block) -> run-length (levels [R], blocks [R])."""
    m = np.frombuffer(lods.encode("ascii"), dtype=np.uint8).astype(np.int16) - ord("0")
    if m.size == 0:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]])
    return m[starts], np.diff(np.r_[starts, m.size]).astype(np.int64)


def row_runs(row: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The focus map of a JSONL row (new ``focus`` or old ``lod_map``) as runs, or None if it has none."""
    if row.get("focus"):
        return decode_runs(row["focus"])
    if row.get("lod_map"):
        return lod_map_runs(row["lod_map"])
    return None


def lod_map(levels: Tensor, indices: Tensor, num_tokens: int) -> str:
    """Per-32-token-block level string of a WC tiling (the old format; O(history), for small histories and
    tests). levels, indices [E] in history order; a partial trailing block counts as LOD0."""
    lv, nb = block_levels(levels, num_tokens)
    per_block = lv[segment_ids(nb, int(nb.sum()))]
    return (per_block + ord("0")).to(torch.uint8).numpy().tobytes().decode("ascii")


def runs_residency(levels: np.ndarray, blocks: np.ndarray) -> dict[str, float]:
    """Fraction of history blocks held at each LOD (keys ``lod0``, ``lod1``, ... up to the coarsest present,
    at least ``lod2``)."""
    total = max(int(blocks.sum()), 1)
    top = max(int(levels.max()) if levels.size else 0, 2)
    per = np.bincount(levels.astype(np.int64), weights=blocks, minlength=top + 1) if levels.size else \
        np.zeros(top + 1)
    return {f"lod{i}": float(per[i]) / total for i in range(top + 1)}


def residency(lods: str) -> dict[str, float]:
    """Fraction of history blocks held at each LOD, from an old-format ``lod_map`` string."""
    return runs_residency(*lod_map_runs(lods))
