"""Per-chunk MegaContext inputs for the benchmark: each scored chunk's working context, built from the prefix
before it and refocused by a focus policy, turned into a scoring :class:`~megacontext.bench.scoring.Job`.

Semantics, for a chunk ``[s, e)`` of ``h`` targets (the same as opening an
:class:`~megacontext.runtime.engine.Engine` over the prefix, calling ``focus_on(query, rounds)`` and
``materialize``; the parity test compares against exactly that):
1. the WC, with a budget of ``w_max - h`` slots, is the recency tiling of the prefix ``[0, s)``
   (``WorkingContext.sync`` from empty, step 0);
2. ``rounds`` policy + allocator steps (default :class:`~megacontext.wc.allocator.AllocatorConfig`) run with the
   ``query_tokens`` tokens before ``s`` as the query, phase ``generate``; a WC with no entries yet has nothing
   to allocate; :class:`~megacontext.focus.RecencyFocus` never has an opinion, so its rounds are skipped;
3. the WC is materialised and followed by the chunk's raw tokens at the next positions, so the base reads at
   most ``w_max`` slots. The embeddings, positions and targets form one Job; the forward runs later, batched
   with other chunks' jobs of the same length.

Why not the Engine itself: it refocuses one WC at a time (plus telemetry and stage timers), so a document of
n chunks costs n * rounds sequential LensNet calls of batch 1, which on a GPU are bound by kernel launches
(about 8 ms per round on the H100 in the probe suite). Chunks are independent, so here they are built in
*waves*: round r of every WC of a wave is scored by one batched call when the policy offers
``scores_batch`` (:class:`BatchedLens`), then each WC takes its own allocator step (vectorised per WC; the
Python loop is over chunks, never over entries). A policy without ``scores_batch`` is called per WC, sees
only a :class:`PrefixHistory` and, when ``fresh_policy`` is set, is a new instance per chunk (LexicalFocus
caches the history it has read). A batched policy reads entries through the *full* history once per round:
a chunk's WC only holds entries inside its own prefix (tiling invariant), so that read sees no future text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.bench.scoring import Job
from megacontext.bench.system import Sample
from megacontext.core.lod import centre_tensor, complete_entries, segment_ids
from megacontext.focus import FocusState, RecencyFocus
from megacontext.tree import InMemoryHistory
from megacontext.tree.history import check_gist_level, check_indices
from megacontext.wc import AllocatorConfig, WorkingContext, WorkingContextConfig, min_w_max


class PrefixHistory:
    """The first ``num_tokens`` tokens of a precomputed history: only entries complete by then are visible."""

    def __init__(self, full: InMemoryHistory, num_tokens: int):
        if not 0 <= num_tokens <= full.num_tokens:
            raise ValueError(f"prefix of {num_tokens} tokens; the history holds {full.num_tokens}")
        self.full, self.num_tokens = full, num_tokens

    def num_entries(self, level: int) -> int:
        return complete_entries(self.num_tokens, level)

    def tokens(self, start: int, end: int) -> Tensor:
        if end > self.num_tokens:
            raise ValueError(f"tokens [{start}, {end}) reach past the prefix of {self.num_tokens} tokens")
        return self.full.tokens(start, end)

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        if end_index > self.num_entries(level):
            raise ValueError(f"LOD{level} gists [{start_index}, {end_index}) are not complete within the prefix "
                             f"of {self.num_tokens} tokens ({self.num_entries(level)} are)")
        return self.full.gists(level, start_index, end_index)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        check_gist_level(level)
        return self.full.gather_gists(level, check_indices(f"LOD{level} gist", indices, self.num_entries(level)))


class BatchedLens:
    """A :class:`~megacontext.focus.lens.LensPolicy` that can also score many WCs in one LensNet call.

    ``scores`` is the wrapped policy's own (so the engine can use this object too); ``scores_batch`` builds
    the same features for every WC (entry vectors, entry ages, the query's last ``tail_tokens`` tokens) and
    runs them as one padded batch: entries right-padded, tails left-padded (LensNet ages tail slots from the
    right), padding masked out."""

    name = "lensnet"

    def __init__(self, policy):
        self.policy = policy
        self.last_targets_batch: list[Tensor] | None = None  # per WC of the last scores_batch (lexical nets)

    @property
    def last_targets(self) -> Tensor | None:
        return getattr(self.policy, "last_targets", None)

    def scores(self, wc, state: FocusState) -> Tensor:
        return self.policy.scores(wc, state)

    @torch.no_grad()
    def scores_batch(self, wcs: list[WorkingContext], states: list[FocusState], source) -> list[Tensor]:
        from megacontext.focus.lens import entry_vectors_from_source

        if not wcs:
            return []
        pol = self.policy
        base, dev = pol.base, pol.base.device
        sizes = torch.tensor([len(wc) for wc in wcs])  # [B]
        if int(sizes.min()) == 0:
            raise ValueError("scores_batch got a working context with no entries; there is nothing to score")
        levels = torch.cat([wc.levels for wc in wcs]).cpu()  # [N]
        indices = torch.cat([wc.indices for wc in wcs]).cpu()
        vec = entry_vectors_from_source(base, source, levels, indices)  # [N, d] float32 on dev
        now = torch.cat([torch.full((len(wc),), st.num_tokens) for wc, st in zip(wcs, states, strict=True)])
        ages = (now - centre_tensor(levels, indices)).float()  # [N]
        b, width = len(wcs), int(sizes.max())
        row = segment_ids(sizes, int(levels.shape[0]))  # [N] WC of each entry
        col = torch.arange(levels.shape[0]) - (torch.cumsum(sizes, 0) - sizes)[row]  # [N] its slot in the row
        entries = vec.new_zeros(b, width, vec.shape[-1])
        entries[row.to(dev), col.to(dev)] = vec  # [B, E, d]
        lv = torch.zeros(b, width, dtype=torch.long)
        lv[row, col] = levels
        ag = torch.zeros(b, width)
        ag[row, col] = ages
        mask = torch.zeros(b, width, dtype=torch.bool)
        mask[row, col] = True
        tails = [st.query.long().cpu()[-pol.tail_tokens:] for st in states]
        t = max(int(q.shape[0]) for q in tails)
        tail_ids = torch.zeros(b, t, dtype=torch.long)
        tail_mask = torch.zeros(b, t, dtype=torch.bool)
        for i, q in enumerate(tails):  # one row per WC
            tail_ids[i, t - q.shape[0]:] = q
            tail_mask[i, t - q.shape[0]:] = True
        tail = base.embed(tail_ids.to(dev)).float()  # [B, T, d]
        lex = None
        if getattr(pol, "lexical", False):  # BM25 feature per entry; best blocks = multi-level move targets
            from megacontext.lensnet.lexfeat import LEX_FEATURES, source_features

            got = [source_features(pol._index, st.source, st.num_tokens, q, wc.levels, wc.indices)
                   for wc, st, q in zip(wcs, states, tails, strict=True)]
            lex = torch.zeros(b, width, LEX_FEATURES)
            lex[row, col] = torch.cat([f for f, _ in got])
            self.last_targets_batch = [best for _, best in got]
            lex = lex.to(dev)
        out = pol.net(entries, lv.to(dev), ag.to(dev), mask.to(dev), tail, tail_mask.to(dev), lexical=lex).cpu()
        return [out[i, :n] for i, n in enumerate(sizes.tolist())]


@dataclass
class ChunkBuild:
    """How chunk contexts are built (the bench system's settings, see MegaContextSystemConfig)."""

    recent_raw: int
    position_mode: str
    rounds: int
    query_tokens: int
    recency: str = "spread"  # WorkingContextConfig.recency of the starting tiling
    allocator: AllocatorConfig | None = None  # None: the engine's default AllocatorConfig()


def wc_budget(w_max: int, h: int, recent_raw: int, who: str) -> int:
    """WC slots left for a chunk of ``h`` targets, or a clear error when the WC cannot exist at that size."""
    budget = w_max - h
    if budget < min_w_max(recent_raw):
        raise ValueError(f"{who}: w_max={w_max} leaves {budget} WC slots for a chunk of {h}; need at least "
                         f"{min_w_max(recent_raw)} for recent_raw={recent_raw} (lower chunk or recent_raw)")
    return budget


def build_wave(base, history: InMemoryHistory, sample: Sample, index: int, bounds: list[tuple[int, int]],
               w_max: int, cfg: ChunkBuild, make_policy: Callable[[], object], fresh_policy: bool) -> list[Job]:
    """Jobs for the chunks ``bounds`` of one sample (see module docstring). ``history`` holds the sample's
    tokens (and gists) at least up to the last chunk start."""
    wcs, states = [], []
    for s, e in bounds:
        wc_cfg = WorkingContextConfig(w_max=wc_budget(w_max, e - s, cfg.recent_raw, "chunk context"),
                                      recent_raw=cfg.recent_raw, position_mode=cfg.position_mode,  # type: ignore[arg-type]
                                      recency=cfg.recency)  # type: ignore[arg-type]
        wc = WorkingContext(wc_cfg)
        wc.sync(s)
        wcs.append(wc)
        query = sample.tokens[max(s - cfg.query_tokens, 0):s]
        extras = {"evidence": sample.meta["evidence"]} if "evidence" in sample.meta else {}  # evidence oracle
        states.append(FocusState(PrefixHistory(history, s), s, query, "generate", extras))
    policy = make_policy()
    if cfg.rounds and not isinstance(policy, RecencyFocus):
        batched = hasattr(policy, "scores_batch")
        policies = [policy] + [make_policy() if fresh_policy and not batched else policy
                               for _ in range(len(wcs) - 1)]
        alloc = cfg.allocator or AllocatorConfig()
        for _ in range(cfg.rounds):
            live = [i for i, wc in enumerate(wcs) if len(wc)]
            if batched:
                scores = policy.scores_batch([wcs[i] for i in live], [states[i] for i in live], history)
                targets = policy.last_targets_batch or [None] * len(live)
            else:
                scores, targets = [], []
                for i in live:  # a policy's last_targets belong to its last scores() call
                    scores.append(policies[i].scores(wcs[i], states[i]))
                    targets.append(getattr(policies[i], "last_targets", None))
            for i, sc, tg in zip(live, scores, targets, strict=True):
                if sc is not None:
                    wcs[i].refocus(sc, alloc, targets=tg if tg is not None and tg.shape == sc.shape else None)
    jobs = []
    for (s, e), wc, st in zip(bounds, wcs, states, strict=True):
        m = wc.materialize(st.source, base.embed)
        t, h = int(m.position_ids.shape[0]), e - s
        if t > wc.cfg.w_max:
            raise AssertionError(f"chunk context at {s} materialised {t} slots > its budget {wc.cfg.w_max}")
        first = s if cfg.position_mode == "absolute" else t
        chunk = sample.tokens[s:e]
        pos = torch.cat([m.position_ids.cpu(), torch.arange(first, first + h)])  # [T + h]
        emb = torch.cat([m.inputs_embeds, base.embed(chunk).to(m.inputs_embeds.dtype)])  # [T + h, d]
        jobs.append(Job(index, s - sample.target_start, chunk, pos, h, embeds=emb))
    return jobs
