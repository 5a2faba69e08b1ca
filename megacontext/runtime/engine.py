"""The runtime loop: stream tokens into the tree, refocus the working context every K tokens, let the
frozen base model read it (to score text or to generate).

One step of the stream (``_advance``) is: optionally score the chunk (:meth:`Engine.score`) -> append up
to K tokens to the history (the tree gists completed blocks in batches) -> ``wc.sync`` (new tokens enter
raw; the recency rule collapses the oldest detail if the budget breaks) -> at every multiple of K a
*refocus*: the focus policy scores the entries, the allocator turns scores into expand/collapse actions,
a telemetry record is written.

Scoring a chunk inside the K-window ``[a, a + K)`` is one base forward over the WC as it was after the
refocus at ``a`` followed by the raw tokens ``[a, end of chunk)``; the chunk's NLL is read off that
forward. A token's context therefore depends only on the stream, not on how the caller split it into
calls (property-tested), and the base reads at most ``w_max + K`` slots while scoring.

Invariants
- The policy only ever sees the history up to the current step, so scores (and therefore the WC the
  base reads) never depend on tokens that have not been streamed yet: ``score`` is causal.
- A materialised WC never exceeds ``w_max`` slots (asserted every time); ``score`` adds at most the K raw
  tokens of the current window after it. In ``debug`` mode the full tiling invariants are checked after
  every change.
- Generation keeps a KV cache of the slots it has read, keyed by what each slot holds (a raw token's
  absolute index, or a gist's level and index); after any change of the WC it crops the cache to the
  common prefix and re-prefills from the first changed slot only. With ``cache_reuse=False`` every step
  re-reads the whole WC, which must produce the same tokens (tested).

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
from megacontext.core.lod import BLOCK
from megacontext.focus.policy import FocusPolicy, FocusState, Phase
from megacontext.focus.registry import POLICY_NAMES, make_policy
from megacontext.runtime.sampling import Sampler, SamplingConfig
from megacontext.runtime.telemetry import StageTimer, StepRecord, Telemetry, TelemetryConfig
from megacontext.tree.window import gathering
from megacontext.wc import (
    ACTION_COST,
    TAIL_SLOT,
    AllocatorConfig,
    Materialized,
    WorkingContext,
    WorkingContextConfig,
    check_invariants,
)

log = logging.getLogger(__name__)

_GIST_KEY = 1 << 40  # slot keys: raw token -> its absolute index; gist -> level * 2^40 + index


@dataclass
class EngineConfig(Config):
    wc: WorkingContextConfig = field(default_factory=WorkingContextConfig)
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    k: int = 32  # tokens between refocus steps
    focus: str = "recency"  # focus policy: recency | lexical | lensnet (lensnet needs a checkpoint)
    query_rounds: int = 4  # allocator steps after a prompt, with the prompt as the query (see module doc)
    cache_reuse: bool = True  # generation: crop the KV cache to the unchanged WC prefix instead of re-reading
    debug: bool = False  # check every tiling invariant after every WC change
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # what telemetry.jsonl records

    def __post_init__(self):
        check(self.k >= 1, f"k={self.k} must be >= 1")
        check(self.query_rounds >= 0, f"query_rounds={self.query_rounds} must be >= 0")
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


def slot_keys(m: Materialized, levels: Tensor, indices: Tensor, num_tokens: int) -> Tensor:
    """What each slot holds, as an int64 key [T] (see ``_GIST_KEY``); equal keys mean equal KV inputs."""
    dev = m.slot_entry.device
    t = m.slot_entry.shape[0]
    s = torch.arange(t, device=dev)
    lv = torch.cat([levels.to(dev), levels.new_zeros(1).to(dev)])  # a dummy entry for tail slots
    ix = torch.cat([indices.to(dev), indices.new_zeros(1).to(dev)])
    first = torch.cat([m.entry_first_slot, m.entry_first_slot.new_zeros(1)])
    tail = m.slot_entry == TAIL_SLOT
    e = torch.where(tail, lv.shape[0] - 1, m.slot_entry)
    entry_key = torch.where(lv[e] == 0, ix[e] * BLOCK + (s - first[e]), lv[e] * _GIST_KEY + ix[e])
    tail_len = int(tail.sum())
    tail_key = num_tokens - tail_len + (s - (t - tail_len))
    return torch.where(tail, tail_key, entry_key)


def common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


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
        self.read_stats = {"slots_read": 0, "slots_reused": 0}  # generation: KV slots computed vs kept
        # the WC as of the last refocus: what score() reads before the current k-window's raw tokens
        self._window_wc = self.wc.clone() if self.num_tokens % self.cfg.k == 0 else None

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

    def _advance(self, chunk: Tensor, phase: Phase, want_nll: bool) -> Tensor | None:
        """Optionally score one chunk (<= k tokens, not crossing a multiple of k), then append it and sync;
        refocus when the stream reaches a multiple of k."""
        n0 = self.num_tokens
        nll = self._score_chunk(chunk, n0) if want_nll else None
        self._append(chunk)
        self._sync(n0 + chunk.numel())
        if self.num_tokens % self.cfg.k == 0:
            self.refocus(phase)
            self._window_wc = self.wc.clone()
        return nll

    @torch.no_grad()
    def _score_chunk(self, chunk: Tensor, n0: int) -> Tensor:
        """NLL [c] of a chunk starting at token n0: the base reads the WC as of the last refocus (at
        ``a = n0 - n0 % k``) followed by the raw tokens [a, n0 + c), so a token's context depends only on
        the stream, never on how callers split it into calls. NaN for a first token with no history."""
        k, c = self.cfg.k, chunk.numel()
        snap = self._window_wc
        if snap is None or snap.num_tokens != n0 - n0 % k:  # e.g. a store reopened mid-window
            snap = self.wc
        a = snap.num_tokens
        with self.timer.stage("prefill"):
            m = snap.materialize(self.view, self.base.embed)
            if m.inputs_embeds.shape[0] > self.cfg.wc.w_max:
                raise AssertionError(f"working context materialised {m.inputs_embeds.shape[0]} slots > "
                                     f"w_max={self.cfg.wc.w_max}")
            fresh = torch.cat([self.source.tokens(a, n0).long(), chunk.long()])  # [n0 - a + c] raw after the WC
            t = m.position_ids.shape[0]
            start = a if self.cfg.wc.position_mode == "absolute" else t
            pos = torch.cat([m.position_ids, torch.arange(start, start + fresh.numel(), device=m.position_ids.device)])
            emb = torch.cat([m.inputs_embeds, self.base.embed(fresh).to(m.inputs_embeds.dtype)])  # [T + F, d]
            keep = c + 1 if n0 > 0 else c
            logits = self.base.forward(emb[None], pos[None], logits_to_keep=keep).logits
            pred = logits[0, :-1].float()  # [c, V] (c - 1 when there is no history to predict chunk[0])
            got = torch.nn.functional.cross_entropy(pred, chunk[c - pred.shape[0]:].to(pred.device),
                                                    reduction="none").cpu()
        return got if n0 > 0 else torch.cat([torch.full((1,), float("nan")), got])

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
        """Stream token ids into the memory (no base-model reads; the policy still refocuses every k)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        bar = tqdm(total=ids.numel(), unit="tok", desc=phase, disable=not progress)
        for chunk in self._chunks(ids):
            self._advance(chunk, phase, want_nll=False)
            bar.update(chunk.numel())
        bar.close()

    def score(self, ids, progress: bool = False) -> ScoreResult:
        """Streaming per-token NLL of ids under MegaContext; the ids are appended to the memory."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        parts = []
        bar = tqdm(total=ids.numel(), unit="tok", desc="score", disable=not progress)
        for chunk in self._chunks(ids):
            parts.append(self._advance(chunk, "score", want_nll=True))
            bar.update(chunk.numel())
        bar.close()
        nll = torch.cat(parts) if parts else torch.zeros(0)
        return ScoreResult(ids, nll)

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
                tel = self.wc.refocus(scores, self.cfg.allocator)
                self._pending_actions[0] += int(tel.n_expand)
                self._pending_actions[1] += int(tel.n_collapse)
            if self.cfg.debug:
                check_invariants(self.wc)
        self.step += 1
        exp, col = self._pending_actions
        self._pending_actions = [0, 0]
        self.telemetry.log(StepRecord(
            step=self.step, num_tokens=n, phase=phase, entries=len(self.wc), wc_cost=self.wc.cost,
            w_max=self.cfg.wc.w_max, expands=exp, collapses=col,
            tiling=(self.wc.levels, self.wc.indices), latency_ms=self.timer.drain()))

    def focus_on(self, query: Tensor, rounds: int | None = None, phase: Phase = "generate") -> None:
        """Run ``rounds`` allocator steps with ``query`` (e.g. a prompt) as what is being read now."""
        for _ in range(self.cfg.query_rounds if rounds is None else rounds):
            self.refocus(phase, query=query)

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
        token is appended to the memory (the memory is the transcript)."""
        cfg = sampling or SamplingConfig()
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        self.ingest(prompt, phase="generate")
        if prompt.numel():
            self.focus_on(prompt)
        if self.num_tokens == 0:
            raise ValueError("generate() needs a non-empty prompt or memory to condition on")
        stop = set(cfg.stop_tokens)
        eos = getattr(self.base.tokenizer, "eos_token_id", None) if self.base.tokenizer is not None else None
        if eos is not None:
            stop.add(int(eos))
        sampler = Sampler(cfg, self.base.device)
        reader = _CachedReader(self)
        logits = reader.logits(changed=True)
        for i in range(cfg.max_new_tokens):
            tok = int(sampler(logits))
            n = self.num_tokens
            self._append(torch.tensor([tok]))
            changed = self._sync(n + 1)
            if self.num_tokens % self.cfg.k == 0:
                before = (self.wc.levels, self.wc.indices)
                self.refocus("generate")
                changed = changed or not (torch.equal(before[0], self.wc.levels)
                                          and torch.equal(before[1], self.wc.indices))
            yield tok
            if tok in stop or i == cfg.max_new_tokens - 1:
                break
            logits = reader.logits(changed=changed, new_token=tok)


class _CachedReader:
    """The base model's view during generation: a KV cache over the WC's slots plus their keys."""

    def __init__(self, engine: Engine):
        self.e = engine
        self.cache = None
        self.keys: Tensor | None = None

    def logits(self, changed: bool, new_token: int | None = None) -> Tensor:
        """Next-token logits [V] for the current WC. ``changed=False`` promises that the WC only grew by
        ``new_token`` since the last call, which allows the one-slot fast path."""
        e = self.e
        base = e.base
        with torch.no_grad():
            if e.cfg.cache_reuse and not changed and self.cache is not None and new_token is not None:
                n = e.num_tokens
                pos = n - 1 if e.cfg.wc.position_mode == "absolute" else self.keys.shape[0]
                with e.timer.stage("decode"):
                    out = base.forward(base.embed(torch.tensor([[new_token]])), torch.tensor([[pos]]),
                                       past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                self.cache = out.past_key_values
                self.keys = torch.cat([self.keys, torch.tensor([n - 1])])
                e.read_stats["slots_read"] += 1
                e.read_stats["slots_reused"] += self.keys.shape[0] - 1
                return out.logits[0, -1]
            with e.timer.stage("prefill"):
                m = e.materialize()
                keys = slot_keys(m, e.wc.levels, e.wc.indices, e.num_tokens).cpu()
                p = 0
                if e.cfg.cache_reuse and self.cache is not None:
                    p = min(common_prefix(self.keys, keys), keys.shape[0] - 1)  # re-read >= 1 slot for logits
                    have = self.keys.shape[0]
                    if p == 0:
                        self.cache = None
                    elif p < have:
                        self.cache.crop(p - have)  # negative = drop that many: same meaning in transformers 4.x/5.x
                else:
                    self.cache = None
                out = base.forward(m.inputs_embeds[p:][None], m.position_ids[p:][None], past_key_values=self.cache,
                                   use_cache=True, logits_to_keep=1)
                self.cache = out.past_key_values
                self.keys = keys
                e.read_stats["slots_read"] += keys.shape[0] - p
                e.read_stats["slots_reused"] += p
                log.debug("re-read %d of %d WC slots (reused %d)", keys.shape[0] - p, keys.shape[0], p)
                return out.logits[0, -1]
