"""The runtime loop: stream tokens into the tree, keep the working context in budget, refocus it, let the
frozen base model read it (to score text or to generate).

Ingest (``lazy_focus``, the default) is batch-shaped: ids go to the tree in batches ending on multiples of
``ingest_batch`` (never more than the tree's commit interval, so its durability cadence holds), each followed by one
``wc.sync`` (new tokens enter raw; the recency rule collapses the oldest detail if the budget breaks) and one
telemetry record. No focus round runs while nobody reads; the WC is marked stale and the next read
(``score``, ``generate``) first runs focus rounds until one changes nothing (``settle_rounds`` at most).
With ``lazy_focus=False`` ingest refocuses every K tokens as before.

While the base reads (``score``, ``generate``) the stream runs in K-token steps (``_advance``: append ->
sync -> at every multiple of K a *refocus*: the policy scores the entries, the allocator turns scores into
expand/collapse actions, a telemetry record is written).

Scoring a chunk inside the K-window ``[a, a + K)`` reads the WC as it was after the refocus at ``a`` followed
by the raw tokens ``[a, end of chunk)``. A token's context therefore depends only on the stream, not on how
the caller split it into calls (property-tested), and it sees at most ``w_max + K`` slots. The reads are
deferred and grouped: chunks whose input extends the previous chunk's share one forward, and every forward
reuses the KV cache of the unchanged slot prefix (:mod:`megacontext.runtime.reader`); the logits are those
of one forward per chunk.

Invariants
- The policy only ever sees the history up to the current step, so scores (and therefore the WC the
  base reads) never depend on tokens that have not been streamed yet: ``score`` is causal. A settle after a
  lazy ingest is causal too (it sees the history up to the read).
- A materialised WC never exceeds ``w_max`` slots (asserted every time). In ``debug`` mode the full tiling
  invariants are checked after every change.
- KV caches are keyed by what each slot holds; after any change of the WC they are cropped to the common
  prefix. With ``cache_reuse=False`` every read re-reads everything, which gives the same tokens (tested).

Design choices
- ``wc.recent_raw >= k`` keeps the newest block raw, so the last WC slot before a window is the true
  previous token. With a budget that holds everything, ``score`` is exactly the base model's own NLL
  (parity test).
- After a prompt, ``query_rounds`` extra allocator steps run with the prompt as the query, because one
  step moves an entry by one level (an LOD2 region needs two steps to reach raw tokens) and the detail
  that can pay for an expansion may still be in its allocator cooldown for a step or two.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from megacontext.base import FrozenBase
from megacontext.core.config import Config, check
from megacontext.focus.policy import FocusPolicy, FocusState, Phase
from megacontext.focus.registry import POLICY_NAMES, make_policy
from megacontext.runtime.generation import generate
from megacontext.runtime.reader import KVReader, common_prefix, materialize_suffix, slot_keys, tiling_keys
from megacontext.runtime.sampling import SamplingConfig
from megacontext.runtime.telemetry import StageTimer, StepRecord, Telemetry, TelemetryConfig
from megacontext.tree.window import gathering
from megacontext.wc import (
    ACTION_COST,
    AllocatorConfig,
    Materialized,
    WorkingContext,
    WorkingContextConfig,
    check_invariants,
)

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "ScoreResult", "common_prefix", "slot_keys"]

@dataclass
class EngineConfig(Config):
    wc: WorkingContextConfig = field(default_factory=WorkingContextConfig)
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    k: int = 32  # tokens between refocus steps
    # focus policy: auto | recency | lexical | lensnet. auto (resolved when a memory is created): LensNet when a
    # checkpoint for this base is given or embedded, else lexical (BM25 over the tree's index, training-free)
    focus: str = "auto"
    query_rounds: int = 4  # allocator steps after a prompt, with the prompt as the query (see module doc)
    cache_reuse: bool = True  # score/generate: crop the KV cache to the unchanged slot prefix instead of re-reading
    # bulk ingest: append + sync in batches of this many tokens, no focus rounds; the next read (score,
    # generate) runs up to settle_rounds focus rounds until the WC is stable. False: refocus every k (as in v1)
    lazy_focus: bool = True
    ingest_batch: int = 16384  # tokens per append + WC sync + telemetry record in a lazy ingest
    settle_rounds: int = 4  # cap on the focus rounds a read runs after a lazy ingest
    score_group: int = 512  # score: most new tokens read by one base forward (chunks whose WC only grew)
    # generation's decode step: auto = "compiled" on CUDA, "off" elsewhere; static = a preallocated HF StaticCache;
    # compiled = static + torch.compile(mode="reduce-overhead") (CUDA graphs). Unsupported -> logged fallback
    fast_decode: str = "auto"
    debug: bool = False  # check every tiling invariant after every WC change
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # what telemetry.jsonl records

    def __post_init__(self):
        check(self.k >= 1, f"k={self.k} must be >= 1")
        check(self.query_rounds >= 0, f"query_rounds={self.query_rounds} must be >= 0")
        check(self.fast_decode in ("auto", "off", "static", "compiled"),
              f"fast_decode={self.fast_decode!r}; expected auto, off, static or compiled")
        check(self.ingest_batch >= 1, f"ingest_batch={self.ingest_batch} must be >= 1")
        check(self.settle_rounds >= 1, f"settle_rounds={self.settle_rounds} must be >= 1")
        check(self.score_group >= self.k, f"score_group={self.score_group} must be >= k={self.k}")
        check(self.focus in POLICY_NAMES, f"focus={self.focus!r}; expected one of {list(POLICY_NAMES)}")
        check(self.wc.recent_raw >= self.k, f"wc.recent_raw={self.wc.recent_raw} must be >= k={self.k}: score() "
                                            "reads each chunk raw, and a chunk is the most recent k tokens")


@dataclass
class ScoreResult:
    token_ids: Tensor  # [n] int64
    nll: Tensor  # [n] float32 nats; NaN for a first token with no history to predict it from

    @property
    def mean_nll(self) -> float:
        v = self.nll[~self.nll.isnan()]
        return float(v.mean()) if v.numel() else float("nan")


class Engine:
    """Streams tokens through a history (tree), a working context and a frozen base model."""

    def __init__(self, base: FrozenBase, source, cfg: EngineConfig | None = None, policy: FocusPolicy | None = None,
                 wc: WorkingContext | None = None, telemetry: Telemetry | None = None, step: int = 0):
        self.base = base
        self.source = source
        # what the WC and the policy read: the source itself when it can gather (tree, InMemoryHistory)
        self.view = gathering(source)
        self.cfg = cfg or EngineConfig()
        self.policy = policy or make_policy(self.cfg.focus)
        self.wc = wc or WorkingContext(self.cfg.wc)
        if self.wc.num_tokens != source.num_tokens:
            self.wc.sync(source.num_tokens)
        self.telemetry = telemetry or Telemetry()
        self.timer = StageTimer(sync=base.device.type == "cuda")
        self.step = step
        self._pending_actions = [0, 0]  # (expands, collapses) since the last record
        # KV slots computed vs kept from the cache: generation, and score's forwards
        self.read_stats = {"slots_read": 0, "slots_reused": 0, "score_slots_read": 0, "score_slots_reused": 0}
        # the WC as of the last refocus: what score() reads before the current k-window's raw tokens
        self._window_wc = self.wc.clone() if self.num_tokens % self.cfg.k == 0 else None
        self._stale = False  # a lazy ingest added tokens no focus round has looked at yet
        self._score_reader = KVReader(base, reuse=self.cfg.cache_reuse)

    # ------------------------------------------------------------------ stream
    @property
    def num_tokens(self) -> int:
        return self.source.num_tokens

    def _sync(self, num_tokens: int) -> bool:
        """wc.sync, counting recency collapses. Returns True when the tiling changed beyond new tokens."""
        before = self.wc.cost
        added = num_tokens - self.wc.num_tokens
        self.wc.sync(num_tokens)
        collapsed = (before + added - self.wc.cost) // ACTION_COST
        self._pending_actions[1] += collapsed
        if self.cfg.debug:
            check_invariants(self.wc)
        return collapsed > 0

    def _append(self, ids: Tensor) -> None:
        with self.timer.stage("gist"):  # the tree compresses completed batches inside append
            self.source.append(ids.cpu())

    def materialize(self) -> Materialized:
        m = self.wc.materialize(self.view, self.base.embed)
        if m.inputs_embeds.shape[0] > self.cfg.wc.w_max:
            raise AssertionError(f"working context materialised {m.inputs_embeds.shape[0]} slots > "
                                 f"w_max={self.cfg.wc.w_max}")
        return m

    def _advance(self, chunk: Tensor, phase: Phase) -> None:
        """Append one chunk (<= k tokens, not crossing a multiple of k) and sync; refocus when the stream
        reaches a multiple of k."""
        n0 = self.num_tokens
        self._append(chunk)
        self._sync(n0 + chunk.numel())
        if self.num_tokens % self.cfg.k == 0:
            self.refocus(phase)
            self._window_wc = self.wc.clone()

    def _chunks(self, ids: Tensor) -> Iterator[Tensor]:
        """Split ids so every chunk ends at a multiple of k of the absolute stream (or at the end)."""
        pos, n = self.num_tokens, ids.numel()
        i = 0
        while i < n:
            take = min(self.cfg.k - pos % self.cfg.k, n - i)
            yield ids[i:i + take]
            i += take
            pos += take

    def ingest(self, ids, phase: Phase = "ingest", progress: bool = False) -> None:
        """Stream token ids into the memory (no base-model reads). With ``lazy_focus`` the ids go in batches of
        ``ingest_batch`` tokens (one append, one WC sync, one telemetry record each) and no focus round runs:
        the next read settles the WC (:meth:`settle`). Otherwise the policy refocuses every k tokens."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        bar = tqdm(total=ids.numel(), unit="tok", unit_scale=True, desc=phase, disable=not progress)
        if not self.cfg.lazy_focus:
            for chunk in self._chunks(ids):
                self._advance(chunk, phase)
                bar.update(chunk.numel())
            bar.close()
            return
        # batches end on multiples of ingest_batch of the absolute stream (so the tiling depends little on how
        # callers split a text) and never pass the tree's commit interval (so its durability cadence holds)
        b = self.cfg.ingest_batch
        cap = getattr(getattr(self.source, "config", None), "commit_tokens", b)
        i = 0
        while i < ids.numel():
            pos = self.num_tokens
            take = min((pos // b + 1) * b - pos, cap, ids.numel() - i)
            piece = ids[i:i + take]
            i += take
            self._append(piece)
            self._sync(self.num_tokens)
            self._stale = True
            self._record(phase)
            bar.update(piece.numel())
        bar.close()
        self._window_wc = None

    def settle(self, phase: Phase, query: Tensor | None = None, rounds: int | None = None) -> int:
        """Focus rounds until one leaves the tiling unchanged (at most ``rounds``, default ``settle_rounds``),
        with the recent tokens (or ``query``) as the query. Causal: it sees only the history so far. Returns
        the number of rounds run."""
        cap = self.cfg.settle_rounds if rounds is None else rounds
        done, moved = 0, True
        while moved and done < cap:
            before = (self.wc.levels.clone(), self.wc.indices.clone())
            self.refocus(phase, query=query)
            done += 1
            moved = not (torch.equal(before[0], self.wc.levels) and torch.equal(before[1], self.wc.indices))
        self._stale = False
        return done

    def score(self, ids, progress: bool = False) -> ScoreResult:
        """Streaming per-token NLL of ids under MegaContext; the ids are appended to the memory.

        A chunk inside the k-window ``[a, a + k)`` is read over the WC as of the refocus at ``a`` followed by
        the raw tokens ``[a, end of chunk)``. The stream (append, sync, refocus) runs ahead of the reads, which
        is causal because a WC depends only on tokens before its window; consecutive chunks whose input is an
        extension of the previous one (the WC only grew) share one forward, and each forward reuses the KV
        cache of the slot prefix that did not change (:class:`~megacontext.runtime.reader.KVReader`)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if self._stale and self.num_tokens:
            self.settle("score")
            self._window_wc = self.wc.clone()
        parts: list[Tensor] = []
        group: list[_Read] = []
        bar = tqdm(total=ids.numel(), unit="tok", unit_scale=True, desc="score", disable=not progress)
        for chunk in self._chunks(ids):
            n0, k = self.num_tokens, self.cfg.k
            snap = self._window_wc
            if snap is None or snap.num_tokens != n0 - n0 % k:  # e.g. a store reopened mid-window
                snap = self.wc.clone()
            a = snap.num_tokens
            fresh = torch.cat([self.source.tokens(a, n0).long(), chunk.long()])  # [n0 - a + c] raw after the WC
            keys = torch.cat([tiling_keys(snap.levels, snap.indices, a), torch.arange(a, n0 + chunk.numel())])
            if group and not group[-1].extended_by(keys, sum(r.chunk.numel() for r in group) + chunk.numel(),
                                                   self.cfg.score_group):
                parts.append(self._read_group(group))
                group = []
            group.append(_Read(chunk, n0, snap, fresh, keys))
            self._advance(chunk, "score")
            bar.update(chunk.numel())
        if group:
            parts.append(self._read_group(group))
        bar.close()
        nll = torch.cat(parts) if parts else torch.zeros(0)
        return ScoreResult(ids, nll)

    @torch.no_grad()
    def _read_group(self, group: list[_Read]) -> Tensor:
        """NLL [sum c] of a group of chunks: one forward over the last chunk's input (which extends every
        earlier one's), after the cached prefix. NaN for a first token with no history to predict it."""
        last = group[-1]
        targets = torch.cat([r.chunk for r in group])  # [C]
        first_n0 = group[0].n0
        need = targets.numel() + (1 if first_n0 > 0 else 0)  # logits from the slot before the group on
        r = self._score_reader
        with self.timer.stage("prefill"):
            p = r.reusable(last.keys, need)
            t_wc = last.keys.shape[0] - last.fresh.numel()
            dev = self.base.device
            if t_wc > self.cfg.wc.w_max:
                raise AssertionError(f"working context of {t_wc} slots > w_max={self.cfg.wc.w_max}")
            if p < t_wc:  # only the slots from the first change on are gathered
                wc_emb, wc_pos = materialize_suffix(last.snap, self.view, self.base.embed, p)
                wc_pos = wc_pos.to(dev)
            else:
                wc_emb, wc_pos = None, None
            skip = max(p - t_wc, 0)
            start = last.snap.num_tokens if self.cfg.wc.position_mode == "absolute" else t_wc
            pos = torch.arange(start + skip, start + last.fresh.numel(), device=dev)  # [F - skip]
            emb = self.base.embed(last.fresh[skip:])
            if wc_emb is not None:
                emb, pos = torch.cat([wc_emb, emb.to(wc_emb.dtype)]), torch.cat([wc_pos, pos])
            logits = r.read(emb, pos, last.keys, p, need)  # [need, V]
            self.read_stats["score_slots_read"] += last.keys.shape[0] - p
            self.read_stats["score_slots_reused"] += p
            pred = logits[:-1].float()  # [need - 1, V]
            got = torch.nn.functional.cross_entropy(pred, targets[targets.numel() - pred.shape[0]:].to(pred.device),
                                                    reduction="none").cpu()
        return got if first_n0 > 0 else torch.cat([torch.full((1,), float("nan")), got])

    # ------------------------------------------------------------------ focus
    def refocus(self, phase: Phase, query: Tensor | None = None) -> None:
        """One policy + allocator step and its telemetry record."""
        n = self.num_tokens
        if query is None:
            q = self.policy.query_tokens
            query = self.source.tokens(max(n - q, 0), n) if n and q else torch.zeros(0, dtype=torch.long)
        with self.timer.stage("lens"):
            scores = self.policy.scores(self.wc, FocusState(self.view, n, query, phase))
        if scores is not None and len(self.wc):
            with self.timer.stage("allocate"):
                # a policy that knows each entry's best block (lexical, LensNet) enables multi-level moves
                tel = self.wc.refocus(scores, self.cfg.allocator, targets=getattr(self.policy, "last_targets", None))
                self._pending_actions[0] += int(tel.n_expand)
                self._pending_actions[1] += int(tel.n_collapse)
            if self.cfg.debug:
                check_invariants(self.wc)
        self._record(phase)

    def _record(self, phase: Phase) -> None:
        """One telemetry record of the WC as it is now (a refocus step, or a lazy-ingest batch)."""
        n = self.num_tokens
        self.step += 1
        exp, col = self._pending_actions
        self._pending_actions = [0, 0]
        self.telemetry.log(StepRecord(
            step=self.step, num_tokens=n, phase=phase, entries=len(self.wc), wc_cost=self.wc.cost,
            w_max=self.cfg.wc.w_max, expands=exp, collapses=col,
            tiling=(self.wc.levels, self.wc.indices), latency_ms=self.timer.drain()))

    def focus_on(self, query: Tensor, rounds: int | None = None, phase: Phase = "generate") -> None:
        """Run ``rounds`` allocator steps with ``query`` (e.g. a prompt) as what is being read now (this also
        settles a WC left stale by a lazy ingest)."""
        for _ in range(self.cfg.query_rounds if rounds is None else rounds):
            self.refocus(phase, query=query)
        self._stale = False

    # ------------------------------------------------------------------ read-only what-ifs
    def _extended(self, extra: Tensor) -> tuple[Tensor, Tensor]:
        """The WC's input followed by ``extra`` raw tokens at the next positions: (embeds [T+X, d], pos [T+X])."""
        m = self.materialize()
        x = extra.numel()
        if self.cfg.wc.position_mode == "absolute":
            nxt = torch.arange(self.num_tokens, self.num_tokens + x)
        else:
            nxt = torch.arange(m.position_ids.shape[0], m.position_ids.shape[0] + x)
        emb = torch.cat([m.inputs_embeds, self.base.embed(extra)])
        return emb, torch.cat([m.position_ids, nxt.to(m.position_ids.device)])

    @torch.no_grad()
    def peek_nll(self, ids) -> Tensor:
        """NLL [X] of ``ids`` if they came next, read over the current WC; nothing is appended to the memory
        and the WC does not change (the base reads the WC plus these X tokens)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if self.num_tokens == 0 or ids.numel() == 0:
            raise ValueError("peek_nll needs a non-empty memory and at least one token")
        emb, pos = self._extended(ids)
        return self.base.nll(emb[None], pos[None], ids[None])[0].cpu()

    @torch.no_grad()
    def peek_greedy(self, max_new_tokens: int, stop: set[int] | None = None) -> list[int]:
        """Greedy continuation of the current WC without appending to the memory or refocusing."""
        out: list[int] = []
        emb, pos = self._extended(torch.zeros(0, dtype=torch.long))
        res = self.base.forward(emb[None], pos[None], use_cache=True, logits_to_keep=1)
        nxt = int(pos[-1]) + 1
        for _ in range(max_new_tokens):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            if stop and tok in stop:
                break
            res = self.base.forward(self.base.embed(torch.tensor([[tok]])), torch.tensor([[nxt]]),
                                    past_key_values=res.past_key_values, use_cache=True, logits_to_keep=1)
            nxt += 1
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids, sampling: SamplingConfig | None = None) -> Iterator[int]:
        """Ingest the prompt, focus on it, then yield generated token ids one by one. Every generated
        token is appended to the memory (the memory is the transcript). See :mod:`megacontext.runtime.generation`."""
        return generate(self, prompt_ids, sampling)


class _Read:
    """One scored chunk waiting for its forward: the WC snapshot it reads, the raw tokens after it, the keys."""

    def __init__(self, chunk: Tensor, n0: int, snap: WorkingContext, fresh: Tensor, keys: Tensor):
        self.chunk, self.n0, self.snap, self.fresh, self.keys = chunk, n0, snap, fresh, keys

    def extended_by(self, keys: Tensor, group_tokens: int, cap: int) -> bool:
        """Whether a later chunk's input (``keys``) starts with this one's, so one forward serves both."""
        n = self.keys.shape[0]
        return group_tokens <= cap and keys.shape[0] > n and torch.equal(keys[:n], self.keys)
