"""MegaContext contenders for the benchmark: gists + working context + a focus policy, scored at ``w_max``.

Registered systems (all share :class:`MegaContextSystem`; only the compressor and the focus policy differ):
- ``megacontext-recency``: trained GistNet LOD1 gists, LOD2 = mean pool of LOD1 gists (GistCompressor with
  ``level2="meanpool"``), recency tiling only (newest raw, older LOD1, oldest LOD2).
- ``megacontext-lensnet``: the same gists + ``rounds`` LensPolicy refocus steps before each scored chunk.
- ``megacontext-lexical``: the same gists + the engine's LexicalFocus. This is a training-free *heuristic*
  (rare n-gram overlap with the recent tokens), not a learned policy; its rows measure what a lexical
  pointer buys, as a reference for LensNet.
- ``meanpool-recency``: untrained mean-pooled gists (MeanPoolCompressor), recency tiling.

How a sample is scored (no token-by-token streaming of the history):
1. The gists of every complete block of the sample are computed once, in big batches on the base model's
   device (:class:`~megacontext.tree.InMemoryHistory`), and cached for the other budgets of the same task.
   A gist only depends on the tokens of its own span, so a prefix view (:class:`PrefixHistory`) that hides
   everything at or after a chunk start is exactly the history a streaming engine would have built.
2. Targets are scored in chunks of ``chunk`` tokens (default K=32). For a chunk ``[s, s + h)`` an
   :class:`~megacontext.engine.Engine` is opened over the prefix ``[0, s)`` with a WC budget of ``w_max - h``
   (recency sync builds the initial tiling), the policy runs ``rounds`` allocator steps with the last
   ``query_tokens`` tokens before ``s`` as "what the model is reading now", and one base forward reads the
   materialised WC followed by the chunk's raw tokens. So the base never reads more than ``w_max`` slots
   (asserted; the largest observed read is reported by :meth:`describe`), which is the same accounting as
   the :class:`~megacontext.bench.system.ContextSystem` baselines, and the WC is refocused between chunks.
   Each chunk starts from the recency tiling, so a chunk's context depends only on the tokens before it.

Not covered, on purpose:
- ``books_ppl`` / ``code_ppl`` are skipped (``skip_tasks``): scoring every token of 100k-token documents
  means one refocus + one ``w_max`` forward per 32 tokens, about 4k sequential steps per document and budget
  (tens of minutes per suite on one H100, since the steps cannot be batched across a document). Use the
  engine's streaming ``score`` (``megacontext eval``) for perplexity curves instead.
- ``megacontext-oracle`` is not registered: :class:`~megacontext.lensnet.oracle.OraclePolicy` measures the
  counterfactual utility of every collapsible entry and up to 192 expandable gists with one base forward
  each (a few hundred forwards per refocus step), times ``rounds`` steps per chunk and several chunks per
  sample, i.e. ~10^5 forwards for the probe suite: far above the suite's time budget, and it needs a
  whole-document ``DocView`` rather than the engine's history view.

FLOPs per sample count the base-model forwards only (GistNet and LensNet work is small next to them for
the 19M base and is not modelled).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megacontext.bench.flops import flop_model
from megacontext.bench.registry import SystemUnavailable, register_system
from megacontext.bench.scoring import chunk_bounds
from megacontext.bench.system import Sample, Scores, System
from megacontext.config import Config, check
from megacontext.engine import Engine, EngineConfig
from megacontext.focus import LexicalFocus, RecencyFocus
from megacontext.spans import BLOCK, complete_entries
from megacontext.tree import InMemoryHistory, MeanPoolCompressor
from megacontext.tree.history import check_gist_level, check_indices
from megacontext.wc_tiling import min_w_max
from megacontext.working_context import WorkingContextConfig

log = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parents[2] / "models"
DEFAULT_GISTNET = MODELS / "gistnet-19m"
DEFAULT_LENSNET = MODELS / "lensnet-19m"


@dataclass
class MegaContextSystemConfig(Config):
    chunk: int = 32  # targets per base forward; the WC is rebuilt and refocused between chunks
    batch_tokens: int = 65536  # accepted with the suite's shared options; forwards here are one chunk each
    recent_raw: int = 128  # the most recent tokens before a chunk stay raw
    position_mode: Literal["absolute", "compact"] = "absolute"
    rounds: int = 4  # policy + allocator steps before each chunk (an LOD2 region needs 2 to reach raw)
    query_tokens: int = 64  # tokens before the chunk given to the policy as the query
    gistnet: str = str(DEFAULT_GISTNET)
    lensnet: str = str(DEFAULT_LENSNET)
    batch_blocks: int = 4096  # blocks per batched compressor call when gisting a history
    gist_dtype: str = "float16"

    def __post_init__(self):
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.recent_raw >= 32, f"recent_raw={self.recent_raw} must be >= 32 (the engine's K)")
        check(self.position_mode in ("absolute", "compact"),
              f"position_mode={self.position_mode!r}; expected 'absolute' or 'compact'")
        check(self.rounds >= 0, f"rounds={self.rounds} must be >= 0")
        check(self.query_tokens >= 1, f"query_tokens={self.query_tokens} must be >= 1")
        check(self.batch_blocks >= 1, f"batch_blocks={self.batch_blocks} must be >= 1")


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


class MegaContextSystem(System):
    """Gists + WC + focus policy behind the harness's ``score`` (see module docstring)."""

    skip_tasks = frozenset({"books_ppl", "code_ppl"})

    def __init__(self, name: str, base, compressor, make_policy, cfg: MegaContextSystemConfig | None = None,
                 info: dict | None = None):
        self.name, self.base, self.compressor, self.make_policy = name, base, compressor, make_policy
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

    def _engine(self, history: InMemoryHistory, start: int, budget: int) -> Engine:
        cfg = self.cfg
        wc_cfg = WorkingContextConfig(w_max=budget, recent_raw=cfg.recent_raw, position_mode=cfg.position_mode)
        return Engine(self.base, PrefixHistory(history, start), EngineConfig(wc=wc_cfg, k=BLOCK),
                      policy=self.make_policy())

    @torch.inference_mode()
    def _score_chunk(self, history: InMemoryHistory, sample: Sample, s: int, e: int, w_max: int):
        h, base, cfg = e - s, self.base, self.cfg
        budget = w_max - h
        if budget < min_w_max(cfg.recent_raw):
            raise ValueError(f"{self.name}: w_max={w_max} leaves {budget} WC slots for a chunk of {h}; need at least "
                             f"{min_w_max(cfg.recent_raw)} for recent_raw={cfg.recent_raw} (lower chunk or recent_raw)")
        engine = self._engine(history, s, budget)
        if cfg.rounds and not isinstance(engine.policy, RecencyFocus):
            engine.focus_on(sample.tokens[max(s - cfg.query_tokens, 0):s], rounds=cfg.rounds)
        m = engine.materialize()  # asserts cost <= budget
        t = int(m.position_ids.shape[0])
        first = s if cfg.position_mode == "absolute" else t
        chunk = sample.tokens[s:e]
        pos = torch.cat([m.position_ids, torch.arange(first, first + h, device=m.position_ids.device)])  # [T + h]
        emb = torch.cat([m.inputs_embeds, base.embed(chunk).to(m.inputs_embeds.dtype)])  # [T + h, d]
        logits = base.forward(emb[None], pos[None], logits_to_keep=h + 1).logits[0, :-1].float()  # [h, V]
        targets = chunk.to(logits.device)
        nll = F.cross_entropy(logits, targets, reduction="none").cpu()
        top1 = (logits.argmax(-1) == targets).cpu()
        read = t + h
        if read > w_max:
            raise AssertionError(f"{self.name} read {read} slots > w_max={w_max}")
        self.max_read[w_max] = max(self.max_read.get(w_max, 0), read)
        flops = self.flops.forward(read, h + 1) if self.flops else float("nan")
        return nll, top1, flops

    def score(self, base, samples: list[Sample], w_max: int) -> list[Scores]:
        from tqdm.auto import tqdm

        if base is not self.base:
            raise ValueError(f"{self.name} was built for base {self.base.name!r}, asked to score with {base.name!r}")
        t0 = time.perf_counter()
        histories = self._histories(samples)
        gist_share = (time.perf_counter() - t0) / max(len(samples), 1)
        out = []
        for sample, history in tqdm(list(zip(samples, histories, strict=True)), desc=f"{self.name} w={w_max}",
                                    unit="sample", leave=False, mininterval=5):
            t1 = time.perf_counter()
            res = Scores(torch.full((sample.n_targets,), float("nan")), torch.zeros(sample.n_targets, dtype=torch.bool))
            for s, e in chunk_bounds(sample.target_start, sample.target_end, self.cfg.chunk):
                nll, top1, flops = self._score_chunk(history, sample, s, e, w_max)
                o = s - sample.target_start
                res.nll[o:o + e - s], res.top1[o:o + e - s] = nll, top1
                res.flops += flops
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            res.seconds = time.perf_counter() - t1 + gist_share
            out.append(res)
        log.info("%s w_max=%d: largest read %d slots", self.name, w_max, self.max_read.get(w_max, 0))
        return out


# ---------------------------------------------------------------------------------------------- factories
def _gist_compressor(base, cfg: MegaContextSystemConfig):
    from megacontext.checkpoint import CheckpointError
    from megacontext.gistnet.compressor import GistCompressor

    try:
        return GistCompressor.load(cfg.gistnet, base, level2="meanpool")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemUnavailable(f"GistNet checkpoint {cfg.gistnet!r} cannot be used with this base: {e}") from e


def _lens_policy(base, cfg: MegaContextSystemConfig):
    from megacontext.checkpoint import CheckpointError
    from megacontext.lensnet.policy import LensPolicy

    try:
        return LensPolicy.load(cfg.lensnet, base)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemUnavailable(f"LensNet checkpoint {cfg.lensnet!r} cannot be used with this base: {e}") from e


def _recency(base, opts):
    cfg = MegaContextSystemConfig.from_dict(opts)
    return MegaContextSystem("megacontext-recency", base, _gist_compressor(base, cfg), RecencyFocus, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "recency"})


def _lensnet(base, opts):
    cfg = MegaContextSystemConfig.from_dict(opts)
    policy = _lens_policy(base, cfg)  # stateless: shared by every chunk
    return MegaContextSystem("megacontext-lensnet", base, _gist_compressor(base, cfg), lambda: policy, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "lensnet"})


def _lexical(base, opts):
    cfg = MegaContextSystemConfig.from_dict(opts)
    # a fresh policy per chunk: LexicalFocus caches the token history it has read
    return MegaContextSystem("megacontext-lexical", base, _gist_compressor(base, cfg), LexicalFocus, cfg,
                             {"gists": "gistnet+l2meanpool", "focus": "lexical n-gram heuristic (not learned)"})


def _meanpool(base, opts):
    cfg = MegaContextSystemConfig.from_dict(opts)
    return MegaContextSystem("meanpool-recency", base, MeanPoolCompressor.from_base(base), RecencyFocus, cfg,
                             {"gists": "meanpool", "focus": "recency"})


register_system("megacontext-recency", _recency)
register_system("megacontext-lensnet", _lensnet)
register_system("megacontext-lexical", _lexical)
register_system("meanpool-recency", _meanpool)
