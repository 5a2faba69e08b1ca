"""MegaContext contenders for the benchmark: gists + working context + a focus policy, scored at ``w_max``.

Registered systems (all share :class:`MegaContextSystem`; only the compressor and the focus policy differ):
- ``megacontext-recency``: trained GistNet LOD1 gists, LOD2 = mean pool of LOD1 gists (GistCompressor with
  ``level2="meanpool"``), recency tiling only (newest raw, older LOD1, oldest LOD2).
- ``megacontext-lensnet``: the same gists + ``rounds`` LensPolicy refocus steps before each scored chunk.
- ``megacontext``: the product default, whatever it is (today the same as ``megacontext-lensnet``: the
  default GistNet and LensNet checkpoints); the suite reports it under this stable name, so a change of
  default moves the row rather than renaming it. A LensNet trained with the lexical feature also passes
  its best-matching blocks to the allocator (multi-level moves).
- ``megacontext-lexical``: the same gists + the engine's LexicalFocus. This is a training-free *heuristic*
  (BM25 of the recent tokens against every older block, from a lexical index of the sample built once and
  shared by its chunks), not a learned policy; its rows measure what a lexical pointer buys, as a
  reference for LensNet. Its best-matching blocks are passed to the allocator (multi-level moves).
- ``meanpool-recency``: untrained mean-pooled gists (MeanPoolCompressor), recency tiling.
- ``megacontext-rawfirst`` / ``megacontext-lensnet-rawfirst``: as ``megacontext-recency`` / ``-lensnet`` but
  the starting tiling is ``recency="raw_first"`` (:func:`~megacontext.wc.tiling.raw_first_tiling`): the
  longest raw suffix that fits and everything older at the coarsest level, instead of collapsing only as far
  as needed (which, on a long history, leaves most slots to LOD1 gists and only ``recent_raw`` raw tokens).
  LensNet was trained on tilings near the default one, so its raw-first row is off its training distribution.

How a sample is scored (no token-by-token streaming of the history):
1. The gists of every complete block of the sample are computed once, in big batches on the base model's
   device (:class:`~megacontext.tree.InMemoryHistory`), and cached for the other budgets of the same task.
   A gist only depends on the tokens of its own span, so a prefix view (:class:`PrefixHistory`) that hides
   everything at or after a chunk start is exactly the history a streaming engine would have built.
2. Targets are scored in chunks of ``chunk`` tokens (default K=32). For a chunk ``[s, s + h)`` the WC
   (budget ``w_max - h``) is the recency tiling of the prefix ``[0, s)``, the policy runs ``rounds``
   allocator steps with the last ``query_tokens`` tokens before ``s`` as "what the model is reading now",
   and one base forward reads the materialised WC followed by the chunk's raw tokens
   (:mod:`megacontext.bench.chunk_contexts`: the same WC as an Engine over the prefix after ``focus_on``,
   parity-tested). The base never reads more than ``w_max`` slots (asserted; the largest observed read is
   reported by :meth:`describe`), the accounting of the :class:`~megacontext.bench.system.ContextSystem`
   baselines. Each chunk starts from the recency tiling, so its context depends only on the tokens before it.
3. Cost: chunks are built in waves of ``wave`` (LensNet scores a whole wave per round in one call) and the
   forwards are batched across chunks and samples by the shared :class:`~megacontext.bench.scoring.Batcher`
   (chunks whose WC + chunk have the same length share a batch). That is what makes the perplexity tasks
   (every token of long documents; ~256 chunks per 32k tokens at chunk 128) affordable; they used to be
   skipped when every chunk ran its own forward.

- ``megacontext-tail512``: ``megacontext`` with ``recent_raw=512`` (the newest 512 tokens always raw instead of
  128): a CPU check (docs/focus_v2.md) found the small protected tail, not the tiling or voluntary collapses,
  behind the default's loss to truncation on perplexity.
- ``megacontext-oracle`` / ``megacontext-oracle-rawfirst``: the same gists with the *evidence oracle*
  (:mod:`megacontext.focus.oracles`): for probes that record where their evidence is, a perfect pointer
  that asks to expand exactly the gists covering it, through the same allocator and rounds. An upper bound on
  where to look; on perplexity and QMSum samples (no evidence ranges) it equals the recency rows.

Not covered, on purpose:
- the *counterfactual* oracle is not registered: :class:`~megacontext.focus.oracles.OraclePolicy` measures the
  counterfactual utility of every collapsible entry and up to 192 expandable gists with one base forward
  each (a few hundred forwards per refocus step), times ``rounds`` steps per chunk and several chunks per
  sample, i.e. ~10^5 forwards for the probe suite: far above the suite's time budget, and it needs a
  whole-document ``DocView`` rather than the engine's history view.

FLOPs per sample count the base-model forwards only (GistNet and LensNet work is small next to them for
the 19M base and is not modelled). Seconds per sample: its share of gisting, its chunks' build time and
its share of the batched forwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from megacontext.bench.chunk_contexts import BatchedLens, ChunkBuild, PrefixHistory, build_wave, wc_budget
from megacontext.bench.flops import flop_model
from megacontext.bench.registry import SystemUnavailable, register_system
from megacontext.bench.scoring import Batcher, chunk_bounds, new_results
from megacontext.bench.system import Sample, Scores, System
from megacontext.core.assets import GISTNET_MODEL, LENSNET_MODEL
from megacontext.core.config import Config, check
from megacontext.focus import LexicalFocus, RecencyFocus
from megacontext.tree import InMemoryHistory, MeanPoolCompressor
from megacontext.wc import AllocatorConfig

log = logging.getLogger(__name__)

__all__ = ["MegaContextSystem", "MegaContextSystemConfig", "PrefixHistory"]



@dataclass
class MegaContextSystemConfig(Config):
    chunk: int = 32  # targets per base forward; the WC is rebuilt and refocused between chunks
    batch_tokens: int = 65536  # input slots per batched base forward (chunks of equal read length share one)
    wave: int = 64  # chunks built together: one batched LensNet call per round; bounds the wave's memory
    recent_raw: int = 128  # the most recent tokens before a chunk stay raw
    recency: Literal["spread", "raw_first"] = "spread"  # starting tiling (WorkingContextConfig.recency)
    position_mode: Literal["absolute", "compact"] = "absolute"
    rounds: int = 4  # policy + allocator steps before each chunk (an LOD2 region needs 2 to reach raw)
    query_tokens: int = 64  # tokens before the chunk given to the policy as the query
    gistnet: str = GISTNET_MODEL  # GistNet checkpoint: a directory or an embedded model name
    lensnet: str = LENSNET_MODEL  # LensNet checkpoint: a directory or an embedded model name
    batch_blocks: int = 4096  # blocks per batched compressor call when gisting a history
    gist_dtype: str = "float16"
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)  # as EngineConfig.allocator

    def __post_init__(self):
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")
        check(self.wave >= 1, f"wave={self.wave} must be >= 1")
        check(self.recent_raw >= 32, f"recent_raw={self.recent_raw} must be >= 32 (the engine's K)")
        check(self.position_mode in ("absolute", "compact"),
              f"position_mode={self.position_mode!r}; expected 'absolute' or 'compact'")
        check(self.recency in ("spread", "raw_first"), f"recency={self.recency!r}; expected 'spread' or 'raw_first'")
        check(self.rounds >= 0, f"rounds={self.rounds} must be >= 0")
        check(self.query_tokens >= 1, f"query_tokens={self.query_tokens} must be >= 1")
        check(self.batch_blocks >= 1, f"batch_blocks={self.batch_blocks} must be >= 1")


class MegaContextSystem(System):
    """Gists + WC + focus policy behind the harness's ``score`` (see module docstring)."""

    def __init__(self, name: str, base, compressor, make_policy, cfg: MegaContextSystemConfig | None = None,
                 info: dict | None = None, fresh_policy: bool = False):
        """``make_policy()`` gives the focus policy: once per wave, or once per chunk with ``fresh_policy``
        (for policies that keep state between calls, like LexicalFocus's token cache)."""
        self.name, self.base, self.compressor, self.make_policy = name, base, compressor, make_policy
        self.fresh_policy = fresh_policy
        self.cfg = cfg or MegaContextSystemConfig()
        self.info = info or {}
        self.flops = flop_model(base)
        self.max_read: dict[int, int] = {}  # w_max -> largest slot count the base read (WC + chunk)
        self._cache_key: tuple[str, ...] | None = None
        self._cache: list[InMemoryHistory] = []

    def describe(self) -> dict:
        return {"name": self.name, **self.info, **self.cfg.to_dict(),
                "max_slots_read": {str(w): n for w, n in sorted(self.max_read.items())}}

    def _histories(self, samples: list[Sample]) -> list[InMemoryHistory]:
        """Gists of every sample up to its last chunk start; reused while the harness sweeps budgets."""
        key = tuple(s.sample_id for s in samples)
        if key != self._cache_key:
            self._cache, self._cache_key = [], None
            for s in samples:
                last = chunk_bounds(s.target_start, s.target_end, self.cfg.chunk)[-1][0]
                self._cache.append(InMemoryHistory(s.tokens[:last], self.compressor, gist_dtype=self.cfg.gist_dtype,
                                                   batch_blocks=self.cfg.batch_blocks))
            self._cache_key = key
        return self._cache

    def score(self, base, samples: list[Sample], w_max: int) -> list[Scores]:
        from tqdm.auto import tqdm

        if base is not self.base:
            raise ValueError(f"{self.name} was built for base {self.base.name!r}, asked to score with {base.name!r}")
        cfg = self.cfg
        plans = [chunk_bounds(s.target_start, s.target_end, cfg.chunk) for s in samples]
        for bounds in plans:  # fail before any work when a chunk cannot fit
            wc_budget(w_max, max(e - s for s, e in bounds), cfg.recent_raw, self.name)
        t0 = time.perf_counter()
        histories = self._histories(samples)
        gist_share = (time.perf_counter() - t0) / max(len(samples), 1)
        build = ChunkBuild(cfg.recent_raw, cfg.position_mode, cfg.rounds, cfg.query_tokens, cfg.recency,
                           cfg.allocator)
        results = new_results(samples)
        progress = tqdm(total=sum(map(len, plans)), desc=f"{self.name} w={w_max}", unit="chunk", leave=False,
                        mininterval=5)
        batcher = Batcher(base, results, cfg.batch_tokens, self.flops, progress)
        for i, (sample, history, bounds) in enumerate(zip(samples, histories, plans, strict=True)):
            results[i].seconds += gist_share
            for w in range(0, len(bounds), cfg.wave):
                t1 = time.perf_counter()
                jobs = build_wave(base, history, sample, i, bounds[w:w + cfg.wave], w_max, build, self.make_policy,
                                  self.fresh_policy)
                results[i].seconds += time.perf_counter() - t1
                for job in jobs:
                    if job.length > w_max:
                        raise AssertionError(f"{self.name} read {job.length} slots > w_max={w_max}")
                    self.max_read[w_max] = max(self.max_read.get(w_max, 0), job.length)
                    batcher.add(job)
        batcher.flush()
        progress.close()
        log.info("%s w_max=%d: largest read %d slots", self.name, w_max, self.max_read.get(w_max, 0))
        return results


# ---------------------------------------------------------------------------------------------- factories
def _gist_compressor(base, cfg: MegaContextSystemConfig):
    from megacontext.core.checkpoint import CheckpointError
    from megacontext.gistnet.compressor import GistCompressor
    from megacontext.gistnet.model import GistNet

    try:  # LOD2 = mean pool of LOD1 gists whatever the checkpoint holds: the setting of the published rows
        return GistCompressor(GistNet.load(cfg.gistnet, base), base, level2="meanpool")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemUnavailable(f"GistNet checkpoint {cfg.gistnet!r} cannot be used with this base: {e}") from e


def _lens_policy(base, cfg: MegaContextSystemConfig):
    from megacontext.core.checkpoint import CheckpointError
    from megacontext.focus.lens import LensPolicy

    try:
        return LensPolicy.load(cfg.lensnet, base)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemUnavailable(f"LensNet checkpoint {cfg.lensnet!r} cannot be used with this base: {e}") from e


def _recency(base, opts, name):
    cfg = MegaContextSystemConfig.from_dict(opts)
    return MegaContextSystem(name, base, _gist_compressor(base, cfg), RecencyFocus, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "recency"})


def _lensnet(base, opts, name):
    cfg = MegaContextSystemConfig.from_dict(opts)
    policy = BatchedLens(_lens_policy(base, cfg))  # stateless: shared by every chunk
    return MegaContextSystem(name, base, _gist_compressor(base, cfg), lambda: policy, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "lensnet"})


def _lexical(base, opts, name):
    cfg = MegaContextSystemConfig.from_dict(opts)
    # one policy per wave: its lexical index belongs to the sample's history and every query is limited to
    # the chunk's prefix, so chunks share it safely (a fresh one per chunk would re-index the prefix each time)
    return MegaContextSystem(name, base, _gist_compressor(base, cfg), LexicalFocus, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "lexical BM25 heuristic (not learned)"},
                             fresh_policy=False)


def _meanpool(base, opts, name):
    cfg = MegaContextSystemConfig.from_dict(opts)
    return MegaContextSystem(name, base, MeanPoolCompressor.from_base(base), RecencyFocus, cfg,
                             {"gists": "meanpool", "focus": "recency"})


def _oracle(base, opts, name):
    from megacontext.focus.oracles import EvidenceFocus

    cfg = MegaContextSystemConfig.from_dict(opts)
    return MegaContextSystem(name, base, _gist_compressor(base, cfg), EvidenceFocus, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "evidence oracle (knows the evidence range)"})


def _register(name: str, factory, **fixed) -> None:
    """Register ``factory`` under ``name``; ``fixed`` config fields override the suite's options."""
    register_system(name, lambda base, opts: factory(base, {**opts, **fixed}, name))


_register("megacontext", _lensnet)  # the product default: keep in step with the defaults of EngineConfig/demo
_register("megacontext-recency", _recency)
_register("megacontext-rawfirst", _recency, recency="raw_first")
_register("megacontext-lensnet", _lensnet)
_register("megacontext-lensnet-rawfirst", _lensnet, recency="raw_first")
_register("megacontext-tail512", _lensnet, recent_raw=512)  # the product focus with a 512-token protected raw tail
_register("megacontext-lexical", _lexical)
_register("megacontext-oracle", _oracle)
_register("megacontext-oracle-rawfirst", _oracle, recency="raw_first")
_register("meanpool-recency", _meanpool)
