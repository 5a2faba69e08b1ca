"""``megacontext eval gist``: the substitutability evaluation of a GistNet, written to docs/results/.

Windows come from one or more token caches (``megacontext data prepare``), one seeded sample per domain;
point ``--cache`` at held-out data (dev books, QMSum val/test, code) or use ``--split val`` on a
training cache. Every variant of a batch is scored in one pass; results carry command, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from megacontext.config import add_config_args, config_from_args
from megacontext.eval.gist import GistEvalConfig, score_windows
from megacontext.eval.gist_report import summarise, targets, to_markdown
from megacontext.eval.provenance import run_info

log = logging.getLogger(__name__)


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


def register(subparsers) -> None:
    p = subparsers.add_parser("gist", help="substitutability of gists vs raw / drop / meanpool (+ cramming bound)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="frozen base model directory (or hub id)")
    p.add_argument("--gistnet", default="none", help="GistNet checkpoint directory, or 'none' for baselines only")
    p.add_argument("--gistnet-lod2", default=None,
                   help="LOD2 checkpoint trained on --gistnet (train gistnet --level 2 --lod1 ...); default: the "
                        "checkpoint's own level 2 if it was trained, else mean pooling of LOD1 gists")
    p.add_argument("--cache", action="append", required=True, help="token cache directory (repeatable)")
    p.add_argument("--split", default="all", choices=("train", "val", "all"), help="document split to sample")
    p.add_argument("--val-fraction", type=float, default=0.05, help="val share used by the split (as in training)")
    p.add_argument("--windows", type=int, default=2000, help="windows per domain")
    p.add_argument("--domains", nargs="+", default=None, help="domains to evaluate (default: all in the caches)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    p.add_argument("--out-dir", default="docs/results", help="where <name>.json and <name>.md are written")
    p.add_argument("--name", default="gist_eval", help="file stem of the outputs")
    p.add_argument("--bootstrap", default="document", choices=("document", "window"),
                   help="resampling unit of the intervals: whole documents (honest for correlated windows) or windows")
    p.add_argument("--scores", default=None, help="also save every per-window score to this .npz")
    p.add_argument("--config", default=None, help="YAML with GistEvalConfig fields (flags override it)")
    add_config_args(p, GistEvalConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megacontext.base import FrozenBase
    from megacontext.tree.compressor import MeanPoolCompressor

    cfg = config_from_args(GistEvalConfig, args, args.config)
    if args.windows < 1:
        raise ValueError(f"--windows={args.windows} must be >= 1")
    base = FrozenBase.load(args.base, device=args.device, dtype=args.dtype)
    gistnet = None
    if args.gistnet != "none":
        from megacontext.gistnet.levels import TwoLevelGist

        gistnet = TwoLevelGist.load(args.gistnet, base, args.gistnet_lod2)
    elif args.gistnet_lod2:
        raise ValueError(f"--gistnet-lod2 {args.gistnet_lod2} needs the LOD1 checkpoint it was trained on (--gistnet)")
    meanpool = MeanPoolCompressor.from_base(base).compress
    windows = load_windows(args.cache, cfg.window - cfg.horizon, cfg.horizon, args.windows, args.split,
                           args.domains, cfg.seed, args.val_fraction)
    t0 = time.perf_counter()
    scores = {dom: score_windows(base, w.tokens, cfg, gistnet, meanpool, desc=dom) for dom, w in windows.items()}
    seconds = time.perf_counter() - t0
    groups = {dom: w.docs for dom, w in windows.items()} if args.bootstrap == "document" else None
    summary = summarise(scores, cfg.n_boot, cfg.seed, groups)
    report = {
        "run": run_info(base.device, getattr(args, "provenance_argv", None)),
        "seconds": seconds,
        "base": args.base,
        "gistnet": args.gistnet,
        "gistnet_lod2": args.gistnet_lod2,
        "caches": args.cache,
        "split": args.split,
        "windows": {dom: int(w.tokens.shape[0]) for dom, w in windows.items()},
        "documents": {dom: int(len(np.unique(w.docs))) for dom, w in windows.items()},
        "bootstrap_unit": args.bootstrap,
        "config": cfg.to_dict(),
        "targets": targets(summary) if gistnet is not None else [],
        "summary": summary,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    md = to_markdown(report)
    (out / f"{args.name}.md").write_text(md + "\n")
    if args.scores:
        flat = {f"{d}/{p}/{s}/{v}": x for d, ps in scores.items() for p, ss in ps.items()
                for s, vs in ss.items() for v, x in vs.items()}
        np.savez_compressed(args.scores, **flat)
    print(md)
    log.info("scored %d windows in %.1f s; wrote %s/%s.{json,md}", sum(report["windows"].values()), seconds,
             out, args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megacontext.eval.commands gist ...``: this command alone, without building the whole CLI
    (so a GPU run does not depend on every other command module importing cleanly)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m megacontext.eval.commands")
    register(parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True))
    args = parser.parse_args(argv)
    args.provenance_argv = ["python", "-m", "megacontext.eval.commands", *argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
