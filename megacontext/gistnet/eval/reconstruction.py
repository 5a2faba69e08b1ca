"""Reconstruction probe: how much of its 32-token block can the frozen base regenerate from one vector?

The base reads ``[BOS][vector][block]`` (:func:`megacontext.gistnet.objective.reconstruction_logits`) and
predicts every block token teacher-forced; *reconstruction accuracy* is the share of the 32 tokens whose
greedy top-1 prediction is right, and the NLL is their mean. Variants, all on the same blocks:

- ``gist``: GistNet's LOD1 gist of the block;
- ``gist_wrong``: the gist of another sampled block in the same slot (a control: what a gist gives when it
  holds nothing specific to the block: topic, style and the base's prior);
- ``meanpool``: the untrained baseline (block mean rescaled to the embedding norm);
- ``none``: no vector at all (the base's unconditional guess of the block after BOS);
- ``cram`` (on a subset): a per-block vector optimised with Adam for this very reconstruction, starting
  from the gist: the bound a 32 -> 1 encoder could reach for this base model. Optimising for the block's
  own reconstruction (not for any later text) means the bound does not leak a continuation.

Blocks come one per evaluation window (a seeded random block of the window's context), so the bootstrap
units and document labels of the other probes apply unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK
from megacontext.core.stats import mean_ci
from megacontext.gistnet.distill import optimise_vectors
from megacontext.gistnet.levels import read_lod1_inputs
from megacontext.gistnet.objective import reconstruction_logits

log = logging.getLogger(__name__)

VARIANTS = ("gist", "gist_wrong", "cram", "meanpool", "none")


@dataclass
class ReconConfig(Config):
    enabled: bool = True  # run the reconstruction probe
    cram_blocks: int = 64  # blocks per domain that also get an optimised vector (the bound); 0 = none
    cram_steps: int = 300  # Adam steps per optimised vector
    cram_lr: float = 0.01
    batch: int = 256  # blocks per forward

    def __post_init__(self):
        check(self.cram_blocks >= 0, f"recon.cram_blocks={self.cram_blocks} must be >= 0")
        check(self.cram_steps >= 1, f"recon.cram_steps={self.cram_steps} must be >= 1")
        check(self.cram_lr > 0, f"recon.cram_lr={self.cram_lr} must be > 0")
        check(self.batch >= 1, f"recon.batch={self.batch} must be >= 1")


def probe_blocks(windows: Tensor, context: int, seed: int) -> Tensor:
    """One seeded block per window [N, 32] from the first ``context`` tokens of windows [N, >= context]."""
    rng = np.random.default_rng([seed, 7])
    which = torch.from_numpy(rng.integers(0, context // BLOCK, size=windows.shape[0]))
    offs = which[:, None] * BLOCK + torch.arange(BLOCK)[None]  # [N, 32]
    return windows[:, :context].gather(1, offs)


def _scores(logits: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block teacher-forced top-1 accuracy [N] and mean NLL [N] from logits [N, 32, V]."""
    targets = blocks.to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(-1)
    acc = (logits.argmax(-1) == targets).float().mean(-1)
    return acc, nll


def _no_vector_logits(base: FrozenBase, blocks: Tensor) -> Tensor:
    """[BOS][block] logits [N, 32, V]: the first block token is predicted from BOS alone."""
    from megacontext.gistnet.objective import full_mask, recon_prefix

    pre = recon_prefix(base)
    if not pre:
        raise ValueError(f"base model {base.name!r} has no BOS/EOS token id; the 'none' variant needs one")
    ids = torch.cat([torch.tensor(pre).expand(blocks.shape[0], -1), blocks.cpu()], dim=1).to(base.device)
    emb = base.embed(ids)  # [N, 1 + 32, d]
    pos = torch.arange(emb.shape[1], device=emb.device)
    return base.forward(emb, pos, full_mask(emb), logits_to_keep=BLOCK + 1).logits[:, :-1].float()


def cram_vectors(base: FrozenBase, blocks: Tensor, init: Tensor, steps: int, lr: float) -> Tensor:
    """Optimise one vector per block [N, d] (from ``init``) for the block's reconstruction NLL: the probe's
    bound, made by the same optimiser as GistNet's distillation targets."""
    return optimise_vectors(base, blocks, init, steps=steps, lr=lr)


def recon_scores(base: FrozenBase, blocks: Tensor, cfg: ReconConfig, gistnet, meanpool, seed: int = 0,
                 ) -> dict[str, np.ndarray]:
    """Columns ``{variant}_acc`` / ``{variant}_nll`` [N] for blocks [N, 32] (``cram_*`` on a seeded subset of
    ``cram_blocks`` rows only, listed in ``cram_rows``)."""
    n = blocks.shape[0]
    cols: dict[str, list[Tensor]] = {}
    gists: list[Tensor] = []

    def add(name: str, acc: Tensor, nll: Tensor) -> None:
        cols.setdefault(f"{name}_acc", []).append(acc.cpu())
        cols.setdefault(f"{name}_nll", []).append(nll.cpu())

    with torch.no_grad():
        for i in range(0, n, cfg.batch):
            b = blocks[i:i + cfg.batch].to(base.device)  # [b, 32]
            vectors = {"meanpool": meanpool(base.embed(b), 1)}
            if gistnet is not None:
                vectors["gist"] = gistnet(read_lod1_inputs(gistnet, base, b), 1)  # [b, d]
                gists.append(vectors["gist"])
            for name, v in vectors.items():
                add(name, *_scores(reconstruction_logits(base, v, b), b))
            add("none", *_scores(_no_vector_logits(base, b), b))
    if gists:  # the wrong-gist control: every block read with the gist of the next sampled block
        wrong = torch.cat(gists).roll(1, dims=0)
        with torch.no_grad():
            for i in range(0, n, cfg.batch):
                b = blocks[i:i + cfg.batch].to(base.device)
                add("gist_wrong", *_scores(reconstruction_logits(base, wrong[i:i + cfg.batch], b), b))
    out = {k: torch.cat(v).numpy() for k, v in cols.items()}
    k = min(cfg.cram_blocks, n)
    if k:
        # a seeded random subset: windows may come in document order, and the first k would share a document
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
        init = torch.cat(gists)[rows.to(gists[0].device)] if gists else \
            meanpool(base.embed(blocks[rows].to(base.device)), 1)
        accs, nlls = [], []
        for i in range(0, k, cfg.batch):
            b = blocks[rows[i:i + cfg.batch]].to(base.device)
            with torch.enable_grad():
                v = cram_vectors(base, b, init[i:i + b.shape[0]], cfg.cram_steps, cfg.cram_lr)
            with torch.no_grad():
                acc, nll = _scores(reconstruction_logits(base, v, b), b)
            accs.append(acc.cpu())
            nlls.append(nll.cpu())
        out["cram_acc"], out["cram_nll"] = torch.cat(accs).numpy(), torch.cat(nlls).numpy()
        out["cram_rows"] = rows.numpy()
    log.info("reconstruction probe: %d blocks (%d crammed)", n, k)
    return out


def summarise_recon(cols: dict[str, np.ndarray], n_boot: int, seed: int,
                    groups: np.ndarray | None = None) -> dict[str, dict]:
    """{variant: {acc, nll, n}} with bootstrap intervals; the crammed subset is summarised on its rows, and
    ``gist_on_cram_rows`` gives the gist on exactly those rows for a paired comparison with the bound."""
    out: dict[str, dict] = {}
    g = None if groups is None else np.asarray(groups)
    for v in VARIANTS:
        if f"{v}_acc" not in cols:
            continue
        rows = cols["cram_rows"] if v == "cram" else np.arange(len(cols[f"{v}_acc"]))
        kw = {"n_boot": n_boot, "seed": seed, "groups": None if g is None else g[rows]}
        out[v] = {"acc": mean_ci(cols[f"{v}_acc"], **kw).to_dict(), "nll": mean_ci(cols[f"{v}_nll"], **kw).to_dict()}
    if "cram_rows" in cols and "gist_acc" in cols:
        rows = cols["cram_rows"]
        kw = {"n_boot": n_boot, "seed": seed, "groups": None if g is None else g[rows]}
        out["gist_on_cram_rows"] = {"acc": mean_ci(cols["gist_acc"][rows], **kw).to_dict(),
                                    "nll": mean_ci(cols["gist_nll"][rows], **kw).to_dict()}
    return out
