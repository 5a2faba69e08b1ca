"""``eval gist`` as a library call: windows from token caches -> substitutability scores -> report files.

Windows come from one or more token caches (``megacontext data prepare``), one seeded sample per domain;
point ``cache`` at held-out data (dev books, QMSum val/test, code) or use ``split="val"`` on a training
cache. Every variant of a batch is scored in one pass (:mod:`.substitution`); the report
(``<out_dir>/<name>.json`` and ``.md``) carries command, commit and machine.

:class:`GistEvalRunConfig` extends the evaluation's own :class:`~.substitution.GistEvalConfig` with what
the run reads and writes, so the CLI generates every flag from one dataclass.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from megacontext.core.assets import BASE_MODEL
from megacontext.core.config import check
from megacontext.core.provenance import run_info
from megacontext.gistnet.eval.report import summarise, targets, to_markdown
from megacontext.gistnet.eval.substitution import GistEvalConfig, score_windows

log = logging.getLogger(__name__)


@dataclass
class GistEvalRunConfig(GistEvalConfig):
    base: str = BASE_MODEL  # frozen base model: a directory, an embedded model name or a hub id
    gistnet: str = "none"  # GistNet checkpoint (directory or embedded name), or 'none' for baselines only
    gistnet_lod2: str | None = None  # LOD2 checkpoint trained on --gistnet; default: its own level 2, else mean pooling
    cache: tuple[str, ...] = ()  # token cache directories (one or more); required
    split: Literal["train", "val", "all"] = "all"  # document split to sample
    val_fraction: float = 0.05  # val share used by the split (as in training)
    windows: int = 2000  # windows per domain
    domains: tuple[str, ...] = ()  # domains to evaluate; empty = all in the caches
    device: str | None = None  # auto (default), cpu, cuda, cuda:N
    dtype: str | None = None  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16
    out_dir: str = "docs/results"  # where <name>.json and <name>.md are written
    name: str = "gist_eval"  # file stem of the outputs
    bootstrap: Literal["document", "window"] = "document"  # resampling unit: whole documents (honest) or windows
    scores: str | None = None  # also save every per-window score to this .npz

    def __post_init__(self):
        super().__post_init__()
        self.cache, self.domains = tuple(self.cache), tuple(self.domains)
        check(len(self.cache) > 0, "cache=() names no token cache: pass --cache DIR [DIR ...]")
        check(self.windows >= 1, f"windows={self.windows} must be >= 1")
        check(self.split in ("train", "val", "all"), f"split={self.split!r}; expected 'train', 'val' or 'all'")
        check(self.bootstrap in ("document", "window"), f"bootstrap={self.bootstrap!r}; expected document or window")
        check(not (self.gistnet == "none" and self.gistnet_lod2),
              f"gistnet_lod2={self.gistnet_lod2!r} needs the LOD1 checkpoint it was trained on (--gistnet)")


class DomainWindows(NamedTuple):
    tokens: torch.Tensor  # [n, context + horizon] int64
    docs: np.ndarray  # [n] "<cache>:<doc index>" of each window, the cluster label of the bootstrap


def load_windows(caches: list[str], context: int, horizon: int, n: int, split: str = "all",
                 domains: list[str] | None = None, seed: int = 0,
                 val_fraction: float = 0.05) -> dict[str, DomainWindows]:
    """{domain: (token ids [n', context + horizon], document labels [n'])}: a fixed seeded sample of up to
    n windows per domain of the caches (a domain found in several caches takes its windows from the first
    cache that holds it)."""
    from megacontext.data.token_cache import TokenCache
    from megacontext.data.windows import WindowConfig, WindowSampler

    length = context + horizon
    out: dict[str, DomainWindows] = {}
    for ci, path in enumerate(caches):
        cache = TokenCache.open(path)
        for dom in sorted(set(cache.doc_domains)):
            if dom in out or (domains and dom not in domains):
                continue
            wcfg = WindowConfig(context=context, horizon=horizon, seed=seed, split=split,
                                val_fraction=val_fraction, domains=(dom,))
            try:
                sampler = WindowSampler(cache, wcfg)
            except ValueError as e:
                log.warning("domain %s of %s skipped: %s", dom, path, e)
                continue
            wins = sampler.sample(n)
            out[dom] = DomainWindows(torch.from_numpy(np.stack([w.tokens for w in wins])),  # [n', length]
                                     np.asarray([f"{ci}:{w.doc_index}" for w in wins]))
            log.info("%s: %d windows of %d tokens from %s (split=%s)", dom, len(wins), length, path, split)
    missing = sorted(set(domains or []) - set(out))
    if missing:
        raise ValueError(f"domain(s) {missing} have no windows of {length} tokens in caches {caches}")
    if not out:
        raise ValueError(f"no windows of {length} tokens in caches {caches} (split={split!r})")
    return out


def run_gist_eval(cfg: GistEvalRunConfig, argv: list[str] | None = None) -> str:
    """Score, summarise and write ``<out_dir>/<name>.{json,md}``; returns the markdown. ``argv``: the command
    line recorded as provenance (default: this process's)."""
    from megacontext.base import FrozenBase
    from megacontext.tree.compressor import MeanPoolCompressor

    base = FrozenBase.load(cfg.base, device=cfg.device, dtype=cfg.dtype)
    gistnet = None
    if cfg.gistnet != "none":
        from megacontext.gistnet.levels import TwoLevelGist

        gistnet = TwoLevelGist.load(cfg.gistnet, base, cfg.gistnet_lod2)
    meanpool = MeanPoolCompressor.from_base(base).compress
    windows = load_windows(list(cfg.cache), cfg.window - cfg.horizon, cfg.horizon, cfg.windows, cfg.split,
                           list(cfg.domains) or None, cfg.seed, cfg.val_fraction)
    t0 = time.perf_counter()
    scores = {dom: score_windows(base, w.tokens, cfg, gistnet, meanpool, desc=dom) for dom, w in windows.items()}
    seconds = time.perf_counter() - t0
    groups = {dom: w.docs for dom, w in windows.items()} if cfg.bootstrap == "document" else None
    summary = summarise(scores, cfg.n_boot, cfg.seed, groups)
    report = {
        "run": run_info(base.device, argv),
        "seconds": seconds,
        "base": cfg.base,
        "gistnet": cfg.gistnet,
        "gistnet_lod2": cfg.gistnet_lod2,
        "caches": list(cfg.cache),
        "split": cfg.split,
        "windows": {dom: int(w.tokens.shape[0]) for dom, w in windows.items()},
        "documents": {dom: int(len(np.unique(w.docs))) for dom, w in windows.items()},
        "bootstrap_unit": cfg.bootstrap,
        "config": {k: v for k, v in cfg.to_dict().items() if k in GistEvalConfig.__dataclass_fields__},
        "targets": targets(summary) if gistnet is not None else [],
        "summary": summary,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    md = to_markdown(report)
    (out / f"{cfg.name}.md").write_text(md + "\n")
    if cfg.scores:
        flat = {f"{d}/{p}/{s}/{v}": x for d, ps in scores.items() for p, ss in ps.items()
                for s, vs in ss.items() for v, x in vs.items()}
        np.savez_compressed(cfg.scores, **flat)
    log.info("scored %d windows in %.1f s; wrote %s/%s.{json,md}", sum(report["windows"].values()), seconds,
             out, cfg.name)
    return md
