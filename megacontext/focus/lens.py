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

Per-round cost (``cache=True``, the default; the same scores and targets as ``cache=False``, tested): entry
features come from an :class:`~megacontext.focus.entry_table.EntryTable` (each entry's feature is computed once
per history, not once per round), and a call whose inputs equal the previous call's (same history object and
length, same tiling, same query: e.g. the prompt rounds after the focus stopped moving) returns the previous
scores and targets without running the network.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, centre_tensor
from megacontext.focus.entry_table import EntryTable
from megacontext.focus.policy import FocusState
from megacontext.lensnet.lexfeat import source_features
from megacontext.lensnet.model import LensNet
from megacontext.tree.history import gather_by_runs
from megacontext.tree.lexical_source import SourceIndex


def entry_vectors_from_source(base, source, levels: Tensor, indices: Tensor) -> Tensor:
    """[E, d] float32 entry features read through a HistorySource (vectorised per level).

    The bookkeeping runs on the CPU (where the WC lives); the device gets the raw blocks' token ids, the gists
    (one copy for every level) and one permutation, and no boolean-mask assignment, so no host sync."""
    lv, ix = levels.cpu().long(), indices.cpu().long()
    if lv.numel() == 0:
        return torch.zeros(0, base.d_model, device=base.device)
    order = torch.argsort(lv, stable=True)  # [E] entries grouped by level, in time order within a level
    parts, gists, start = [], [], 0
    for level, count in enumerate(torch.bincount(lv).tolist()):  # levels above 2 (LOD3+) read like any gist
        sel = order[start:start + count]
        start += count
        if not count:
            continue
        if level == 0:  # one tokens() read per run of adjacent raw blocks: cost follows the raw entries
            blocks = gather_by_runs(lambda s, e: source.tokens(s * BLOCK, e * BLOCK).reshape(-1, BLOCK), ix[sel])
            mean = base.embed(blocks.to(base.device)).float().mean(1)  # [n0, d]
            parts.append(mean * (base.embed_norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6)))
        else:
            gists.append(source.gather_gists(level, ix[sel]))  # [n_l, d] CPU
    if gists:
        parts.append(torch.cat(gists).float().to(base.device))
    feats = torch.cat(parts) if len(parts) > 1 else parts[0]  # [E, d] in ``order``
    return torch.empty_like(feats).index_copy_(0, order.to(base.device), feats)


class LensPolicy:
    """Scores from a trained LensNet (positive = expand, negative = collapse, in the allocator's units)."""

    name = "lensnet"

    def __init__(self, net: LensNet, base, tail_tokens: int | None = None, cache: bool = True):
        self.net, self.base = net.eval(), base
        self.cache = cache  # False: recompute everything every call (the reference the cached path is tested on)
        self._table = EntryTable(lambda src, lv, ix: entry_vectors_from_source(base, src, lv, ix), base.d_model,
                                 base.device)
        self._memo: tuple | None = None  # (inputs, scores, targets) of the last call
        self._params = list(net.parameters())  # walked once: net.parameters() costs ~1 ms per call
        self.tail_tokens = tail_tokens or net.cfg.tail_tokens
        self.query_tokens = self.tail_tokens  # the engine's streaming query is exactly the tail LensNet reads
        self.lexical = bool(net.cfg.lexical_features)
        self._index = SourceIndex()  # lexical index of sources that keep none (a store keeps its own)
        self.last_targets: Tensor | None = None  # best-matching block per entry of the last call (lexical nets)

    @classmethod
    def load(cls, directory, base) -> LensPolicy:
        net, _ = LensNet.load(directory, base)
        return cls(net, base)

    def _net_version(self) -> tuple:
        """Changes whenever a parameter is modified in place (an optimiser step, ``load_state_dict``) or moved
        (``.to()``, ``.half()``), so memoised scores expire."""
        first = self._params[0] if self._params else None
        return (sum(p._version for p in self._params), first.data_ptr() if first is not None else 0,
                first.dtype if first is not None else None)

    def _same_inputs(self, source, num_tokens: int, levels: Tensor, indices: Tensor, query: Tensor) -> bool:
        """Whether this call's inputs equal the memoised call's (tensors compared on the CPU, where the WC lives)."""
        if not self.cache or self._memo is None:
            return False
        (src, n, lv, ix, q, version), _, _ = self._memo
        return (src() is source and n == num_tokens and version == self._net_version()
                and lv.shape == levels.shape and q.shape == query.shape
                and torch.equal(lv, levels) and torch.equal(ix, indices) and torch.equal(q, query))

    @torch.no_grad()
    def score_entries(self, source, num_tokens: int, levels: Tensor, indices: Tensor,
                      query: Tensor | None = None) -> Tensor:
        if query is None or query.numel() == 0:
            query = source.tokens(max(num_tokens - self.tail_tokens, 0), num_tokens)
        query = query[-self.tail_tokens:]
        if self._same_inputs(source, num_tokens, levels, indices, query):
            self.last_targets = self._memo[2]
            return self._memo[1]
        if self.cache:
            vec = self._table.get(source, levels, indices)  # [E, d]
        else:
            vec = entry_vectors_from_source(self.base, source, levels, indices)  # [E, d]
        ages = (num_tokens - centre_tensor(levels, indices)).float()
        tail = self.base.embed(query.to(self.base.device)).float()  # [T, d]
        mask = torch.ones(1, levels.shape[0], dtype=torch.bool, device=vec.device)
        lex = None
        if self.lexical:
            lex, best = source_features(self._index, source, num_tokens, query.cpu(), levels, indices)  # [E, 3]
            self.last_targets = best.to(levels.device)
            lex = lex[None]
        out = self.net(vec[None], levels[None], ages[None], mask, tail[None], lexical=lex)[0].to(levels.device)
        if self.cache:
            try:
                ref = weakref.ref(source)
            except TypeError:  # a source without weak references is never memoised
                ref = None
            # copies: a caller may refill its query (or index) buffer in place before the next call
            key = (ref, num_tokens, levels.clone(), indices.clone(), query.clone(), self._net_version())
            self._memo = (key, out, self.last_targets) if ref is not None else None
        return out

    def scores(self, wc, state: FocusState) -> Tensor:
        """FocusPolicy protocol; an empty ``state.query`` means "the most recent ``tail_tokens`` tokens"."""
        return self.score_entries(state.source, state.num_tokens, wc.levels, wc.indices, state.query)
