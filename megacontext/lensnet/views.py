"""What LensNet and its labels see of a document: gist tables, sampled tilings, entry features, variants.

A :class:`DocView` holds one document's token ids and its LOD1/LOD2 gists (computed once with any compressor); its
tilings use levels up to :data:`DOC_LEVELS` = 2 only (what LensNet is trained on), so every tiling function below is
called with ``max_level=DOC_LEVELS``. A working context at history length ``t`` (block-aligned) is a tiling
(:class:`megacontext.wc.tiling.EntryState`) of ``[0, t)``; the base model reads it as a slot sequence in which an
LOD0 block contributes its 32 tokens at their own positions and a gist one vector at the centre of its span. A slot
is encoded as ``(token id, gist row)`` with ``gist row = -1`` for raw tokens; gist rows index ``cat([lod1, lod2])``.
Variants (the counterfactuals of the labels) change one entry: an expansion replaces one slot by 32, a
collapse replaces 32 slots by one, so every variant of one kind has the same length (L + 31 or L - 31) and
a whole batch of them is built by one broadcast ``torch.where`` over ``[n, L +- 31]`` indices, without
per-variant Python work or padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, centre_tensor, cost_tensor, segment_ids
from megacontext.gistnet.levels import read_lod1_inputs
from megacontext.wc import (
    EntryState,
    apply_actions,
    collapse_by_recency,
    first_protected_block,
    min_cost,
    sibling_runs,
)

DOC_LEVELS = 2  # a DocView holds LOD1 and LOD2 gists; its tilings never use a coarser level


def compress(compressor, x: Tensor, level: int) -> Tensor:
    """Call a tree-style compressor (``.compress(x, level)``) or a GistNet-style module (``(x, level)``)."""
    fn = getattr(compressor, "compress", None)
    return (fn(x, level) if fn is not None else compressor(x, level)).float()


@dataclass
class DocView:
    ids: Tensor  # [N] int64, on the base model's device
    lod1: Tensor  # [N // 32, d] float32
    lod2: Tensor  # [N // 1024, d] float32

    @classmethod
    @torch.no_grad()
    def build(cls, base, compressor, ids: Tensor, chunk: int = 4096) -> DocView:
        ids = torch.as_tensor(ids, dtype=torch.long).to(base.device)
        n1 = ids.shape[0] // BLOCK
        blocks = ids[: n1 * BLOCK].view(n1, BLOCK)
        lod1 = torch.cat([compress(compressor, read_lod1_inputs(compressor, base, blocks[i:i + chunk]).float(), 1)
                          for i in range(0, n1, chunk)] or [torch.empty(0, base.d_model, device=base.device)])
        n2 = n1 // BLOCK
        lod2 = compress(compressor, lod1[: n2 * BLOCK].view(n2, BLOCK, -1), 2) if n2 else lod1[:0]
        return cls(ids, lod1.to(base.device), lod2.to(base.device))

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def gist_table(self) -> Tensor:
        return torch.cat([self.lod1, self.lod2])  # [N1 + N2, d]

    # ------------------------------------------------------------------ slots
    def entry_slots(self, levels: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slots of a tiling: (token ids [L], gist rows [L], positions [L]), L = total cost."""
        n = cost_tensor(levels)
        src = segment_ids(n, int(n.sum()))  # [L] entry of each slot
        j = torch.arange(src.shape[0], device=levels.device) - (torch.cumsum(n, 0) - n)[src]  # slot in entry
        lv, ix = levels[src], indices[src]
        raw = lv == 0
        tok_pos = ix * BLOCK + j
        tok = torch.where(raw, self.ids[tok_pos.clamp(max=self.num_tokens - 1)], 0)
        rows = torch.where(raw, -1, torch.where(lv == 1, ix, self.lod1.shape[0] + ix))
        pos = torch.where(raw, tok_pos, centre_tensor(lv, ix))
        return tok, rows, pos

    def embed_slots(self, base, tok: Tensor, rows: Tensor) -> Tensor:
        """[..., L] slot codes -> [..., L, d] input embeddings in the base model's dtype."""
        table = self.gist_table().to(base.dtype)
        gist = table[rows.clamp(min=0)] if table.shape[0] else torch.zeros(*rows.shape, base.d_model,
                                                                          device=rows.device, dtype=base.dtype)
        return torch.where((rows >= 0).unsqueeze(-1), gist, base.embed(tok))

    # ------------------------------------------------------------------ entry features
    def entry_vectors(self, base, levels: Tensor, indices: Tensor) -> Tensor:
        """LensNet's view of each entry [E, d] float32: the gist, or an LOD0 block's mean token embedding
        rescaled to the base model's mean embedding norm (the same scale as a gist)."""
        raw = levels == 0
        blocks = indices.clamp(max=self.lod1.shape[0] - 1)
        tok = self.ids[(blocks * BLOCK).unsqueeze(1) + torch.arange(BLOCK, device=levels.device)]  # [E, 32]
        mean = base.embed(tok).float().mean(1)
        mean = mean * (base.embed_norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        table = self.gist_table()
        rows = torch.where(levels == 1, indices, self.lod1.shape[0] + indices).clamp(0, max(table.shape[0] - 1, 0))
        gist = table[rows] if table.shape[0] else torch.zeros_like(mean)
        return torch.where(raw.unsqueeze(1), mean, gist)


def entry_ages(levels: Tensor, indices: Tensor, t: int) -> Tensor:
    """Tokens from each entry's centre to the end of the history: [E] float32."""
    return (t - centre_tensor(levels, indices)).float()


def actionable(state: EntryState, t: int, recent_raw: int) -> tuple[Tensor, Tensor]:
    """(expandable [E], collapsible [E]) bool masks of a legal tiling at history length t."""
    fp = first_protected_block(t, recent_raw)
    expandable = state.levels >= 1
    runs = sibling_runs(state.levels, state.indices, fp, DOC_LEVELS)
    collapsible = ((state.levels == 0) & (state.indices < fp)) | runs
    return expandable, collapsible


def recency_tiling(t: int, w_max: int, recent_raw: int, device=None) -> EntryState:
    """The tiling the recency policy keeps: everything LOD0, collapsed oldest-first until it fits."""
    nb = t // BLOCK
    z = torch.zeros(nb, dtype=torch.long, device=device)
    state = EntryState(z, torch.arange(nb, device=device), z.clone(), z.clone())
    return collapse_by_recency(state, t, recent_raw, w_max, step=0, max_level=DOC_LEVELS)


def sample_tiling(t: int, w_max: int, recent_raw: int, n_expand: int, n_collapse: int,
                  gen: torch.Generator, device=None) -> EntryState:
    """A legal tiling near the recency one: recency at a budget shifted by the planned moves, then
    ``n_expand`` random gists expanded and ``n_collapse`` random collapsible entries collapsed, then refit."""
    w0 = max(w_max + (n_collapse - n_expand) * (BLOCK - 1), min_cost(t, recent_raw, DOC_LEVELS))
    state = recency_tiling(t, w0, recent_raw, device)
    for kind, k in (("expand", n_expand), ("collapse", n_collapse)):
        exp_m, col_m = actionable(state, t, recent_raw)
        cand = exp_m if kind == "expand" else col_m
        if k <= 0 or not bool(cand.any()):
            continue
        pr = torch.rand(cand.shape[0], generator=gen).to(cand.device).masked_fill(~cand, 2.0)
        pick = torch.zeros_like(cand)
        pick[pr.argsort()[: min(k, int(cand.sum()))]] = True
        none = torch.zeros_like(cand)
        state = apply_actions(state, pick if kind == "expand" else none, pick if kind == "collapse" else none, 0,
                              mark=False)
    return collapse_by_recency(state, t, recent_raw, w_max, step=0, max_level=DOC_LEVELS)


def expand_variants(view: DocView, state: EntryState, which: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slot codes of the tiling with entry ``which[v]`` (a gist) expanded, for each v: three [n, L + 31]."""
    tok, rows, pos = view.entry_slots(state.levels, state.indices)
    offs = torch.cumsum(cost_tensor(state.levels), 0) - cost_tensor(state.levels)  # [E] first slot of entry
    lv, ix, off = state.levels[which], state.indices[which], offs[which]  # [n]
    L = tok.shape[0]
    p = torch.arange(L + BLOCK - 1, device=tok.device)  # [L + 31]
    j = (p.unsqueeze(0) - off.unsqueeze(1))  # [n, L + 31] slot index inside the new children
    inside = (j >= 0) & (j < BLOCK)
    src = torch.where(j >= BLOCK, p - (BLOCK - 1), p).clamp(max=L - 1)  # unchanged slots shift by 31
    child = ix.unsqueeze(1) * BLOCK + j.clamp(0, BLOCK - 1)  # token pos (LOD1 parent) or LOD1 index (LOD2)
    is1 = (lv == 1).unsqueeze(1)
    c_tok = torch.where(is1, view.ids[child.clamp(max=view.num_tokens - 1)], 0)
    c_row = torch.where(is1, -1, child)
    c_pos = torch.where(is1, child, centre_tensor(torch.ones_like(child), child))
    return (torch.where(inside, c_tok, tok[src]), torch.where(inside, c_row, rows[src]),
            torch.where(inside, c_pos, pos[src]))


def collapse_variants(view: DocView, state: EntryState, which: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slot codes with entry ``which[v]`` collapsed (an LOD0 block -> its gist, a sibling-run start -> the
    LOD2 parent), for each v: three [n, L - 31]. Both replace 32 consecutive slots by one."""
    tok, rows, pos = view.entry_slots(state.levels, state.indices)
    offs = torch.cumsum(cost_tensor(state.levels), 0) - cost_tensor(state.levels)
    lv, ix, off = state.levels[which], state.indices[which], offs[which]
    L = tok.shape[0]
    p = torch.arange(L - (BLOCK - 1), device=tok.device).unsqueeze(0)  # [1, L - 31]
    at = p == off.unsqueeze(1)  # [n, L - 31]
    src = torch.where(p > off.unsqueeze(1), p + BLOCK - 1, p)
    new_lv = lv + 1
    new_ix = torch.where(lv == 0, ix, ix // BLOCK)
    n_row = torch.where(new_lv == 1, new_ix, view.lod1.shape[0] + new_ix).unsqueeze(1)
    n_pos = centre_tensor(new_lv, new_ix).unsqueeze(1)
    return (torch.where(at, 0, tok[src]), torch.where(at, n_row, rows[src]), torch.where(at, n_pos, pos[src]))


class DocSource:
    """A :class:`DocView` seen as a history (the ``tokens`` / ``gather_gists`` part of
    :class:`~megacontext.tree.history.HistorySource` that materialisation and policies read), truncated to the
    first ``num_tokens`` tokens (the part that has been "read"; the rest is the future)."""

    def __init__(self, view: DocView, num_tokens: int):
        self.view, self.num_tokens = view, num_tokens

    def tokens(self, start: int, end: int) -> Tensor:
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"tokens({start}, {end}) outside the history [0, {self.num_tokens})")
        return self.view.ids[start:end]

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        if level not in (1, 2):
            raise ValueError(f"level={level}; a DocView holds LOD1 and LOD2 gists only")
        table = self.view.lod1 if level == 1 else self.view.lod2
        return table[indices.to(table.device)]
