"""BM25 retrieval baseline: raw recent window + the history blocks that best match the recent tokens.

Rule for a chunk with context budget ``B`` and history ``[0, s)``:
1. keep a raw recent window of ``R`` tokens, ``R >= max(query_tokens, recent_fraction * B)``, grown to
   absorb what is left after whole 32-token blocks;
2. score every complete 32-token block (on the absolute 32-token grid) that ends before the recent window
   with BM25 (``rank_bm25.BM25Okapi``; "words" are token ids) against the last ``query_tokens`` tokens;
3. insert the top ``(B - R) / 32`` blocks raw, in time order, before the recent window; ties prefer
   recent blocks. Positions ``absolute`` (default: blocks keep their stream positions, so the model sees
   true distances) or ``compact`` (0..T-1).

The index is rebuilt per chunk over the past only, so document statistics (IDF, average length) never
include future text. That costs CPU time (~50 ms per chunk at 100k tokens), which is why this system can
compute selections in ``workers`` processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from megacontext.bench.scoring import ContextSystem
from megacontext.bench.system import Selection, place
from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK


@dataclass
class RetrievalConfig(Config):
    recent_fraction: float = 0.5
    query_tokens: int = 64
    positions: str = "absolute"
    chunk: int = 128
    batch_tokens: int = 65536
    workers: int = 1

    def __post_init__(self):
        check(0.0 <= self.recent_fraction <= 1.0, f"recent_fraction={self.recent_fraction} must lie in [0, 1]")
        check(self.query_tokens >= 1, f"query_tokens={self.query_tokens} must be >= 1")
        check(self.positions in ("compact", "absolute"),
              f"positions={self.positions!r} must be 'compact' or 'absolute'")
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")
        check(self.workers >= 1, f"workers={self.workers} must be >= 1")


def _words(ids: np.ndarray) -> list[list[str]]:
    return [[str(t) for t in row] for row in ids.tolist()]


def rank_blocks(blocks: np.ndarray, query: np.ndarray) -> np.ndarray:
    """BM25 scores of ``blocks`` [n, BLOCK] against ``query`` [q] ids -> [n] float64."""
    from rank_bm25 import BM25Okapi

    return np.asarray(BM25Okapi(_words(blocks)).get_scores([str(t) for t in query.tolist()]), dtype=np.float64)


def bm25_selection(history: Tensor, budget: int, cfg: RetrievalConfig) -> Selection:
    s = int(history.shape[0])
    mode = cfg.positions
    if s <= budget:
        return Selection(*place([history], [0], mode))  # type: ignore[arg-type]
    floor = min(budget, max(cfg.query_tokens, int(cfg.recent_fraction * budget)))
    n_fit = (budget - floor) // BLOCK
    recent_len = budget - n_fit * BLOCK
    n_search = (s - recent_len) // BLOCK
    if n_fit == 0 or n_search == 0:
        return Selection(*place([history[s - budget:]], [s - budget], mode))  # type: ignore[arg-type]
    if n_search <= n_fit:
        chosen = np.arange(n_search)
    else:
        hist = history.numpy()
        blocks = hist[:n_search * BLOCK].reshape(n_search, BLOCK)
        scores = rank_blocks(blocks, hist[s - cfg.query_tokens:])
        order = np.lexsort((-np.arange(n_search), -scores))  # by score desc, ties -> more recent first
        chosen = np.sort(order[:n_fit])
    pieces = [history[b * BLOCK:(b + 1) * BLOCK] for b in chosen.tolist()] + [history[s - recent_len:]]
    starts = [b * BLOCK for b in chosen.tolist()] + [s - recent_len]
    return Selection(*place(pieces, starts, mode))  # type: ignore[arg-type]


class BM25Retrieval(ContextSystem):
    def __init__(self, cfg: RetrievalConfig | None = None):
        self.cfg = cfg or RetrievalConfig()
        self.name = f"bm25-{self.cfg.positions}"
        self.chunk, self.batch_tokens, self.workers = self.cfg.chunk, self.cfg.batch_tokens, self.cfg.workers

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.to_dict()}

    def select(self, history: Tensor, budget: int) -> Selection:
        return bm25_selection(history, budget, self.cfg)
