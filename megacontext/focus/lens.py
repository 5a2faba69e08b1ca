"""LensPolicy: LensNet behind the engine's focus-policy protocol ``scores(wc, state) -> Tensor [E]``.

The policy reads the WC's entries from the history source (``tokens(start, end)`` once per run of adjacent
raw blocks, ``gather_gists`` for gists, so the read cost never depends on how far apart entries lie), builds
exactly the features LensNet was trained on (see :mod:`megacontext.lensnet.views`: gist vectors, or an
LOD0 block's mean token embedding rescaled to the base's mean embedding norm; ages from the entry centre
to the end of the history) and a tail of the most recent ``tail_tokens`` tokens — or the prompt/query
when the state carries one, so a question steers the focus.

A LensNet trained with the lexical feature (``cfg.lexical_features``) also gets each entry's BM25 match
against that tail from the history's lexical index (:mod:`megacontext.lensnet.lexfeat`); the policy then
exposes the best-matching block under each entry as ``last_targets`` [E] (-1 = none), which the allocator
uses for multi-level moves when the caller passes it on (``wc.refocus(scores, cfg, targets=...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, centre_tensor
from megacontext.focus.policy import FocusState
from megacontext.lensnet.lexfeat import source_features
from megacontext.lensnet.model import LensNet
from megacontext.tree.history import gather_by_runs
from megacontext.tree.lexical_source import SourceIndex


def entry_vectors_from_source(base, source, levels: Tensor, indices: Tensor) -> Tensor:
    """[E, d] float32 entry features read through a HistorySource (vectorised per level)."""
    d = base.d_model
    out = torch.zeros(levels.shape[0], d, device=base.device)
    raw = levels == 0
    if bool(raw.any()):
        # one tokens() read per run of adjacent raw blocks: cost follows the raw entries, not their spread
        blocks = gather_by_runs(lambda s, e: source.tokens(s * BLOCK, e * BLOCK).reshape(-1, BLOCK),
                                indices[raw].cpu().long())  # [n0, 32]
        mean = base.embed(blocks.to(base.device)).float().mean(1)  # [n0, d]
        out[raw.to(base.device)] = mean * (base.embed_norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    top = int(levels.max()) if levels.numel() else 0  # levels above 2 (LOD3+) are read like any gist
    for level in range(1, top + 1):
        m = levels == level
        if bool(m.any()):
            out[m.to(base.device)] = source.gather_gists(level, indices[m]).float().to(base.device)
    return out


class LensPolicy:
    """Scores from a trained LensNet (positive = expand, negative = collapse, in the allocator's units)."""

    name = "lensnet"

    def __init__(self, net: LensNet, base, tail_tokens: int | None = None):
        self.net, self.base = net.eval(), base
        self.tail_tokens = tail_tokens or net.cfg.tail_tokens
        self.query_tokens = self.tail_tokens  # the engine's streaming query is exactly the tail LensNet reads
        self.lexical = bool(net.cfg.lexical_features)
        self._index = SourceIndex()  # lexical index of sources that keep none (a store keeps its own)
        self.last_targets: Tensor | None = None  # best-matching block per entry of the last call (lexical nets)

    @classmethod
    def load(cls, directory, base) -> LensPolicy:
        net, _ = LensNet.load(directory, base)
        return cls(net, base)

    @torch.no_grad()
    def score_entries(self, source, num_tokens: int, levels: Tensor, indices: Tensor,
                      query: Tensor | None = None) -> Tensor:
        vec = entry_vectors_from_source(self.base, source, levels, indices)  # [E, d]
        ages = (num_tokens - centre_tensor(levels, indices)).float()
        if query is None or query.numel() == 0:
            query = source.tokens(max(num_tokens - self.tail_tokens, 0), num_tokens)
        query = query[-self.tail_tokens:]
        tail = self.base.embed(query.to(self.base.device)).float()  # [T, d]
        mask = torch.ones(1, levels.shape[0], dtype=torch.bool, device=vec.device)
        lex = None
        if self.lexical:
            lex, best = source_features(self._index, source, num_tokens, query.cpu(), levels, indices)  # [E, 3]
            self.last_targets = best.to(levels.device)
            lex = lex[None]
        return self.net(vec[None], levels[None], ages[None], mask, tail[None], lexical=lex)[0].to(levels.device)

    def scores(self, wc, state: FocusState) -> Tensor:
        """FocusPolicy protocol; an empty ``state.query`` means "the most recent ``tail_tokens`` tokens"."""
        return self.score_entries(state.source, state.num_tokens, wc.levels, wc.indices, state.query)
