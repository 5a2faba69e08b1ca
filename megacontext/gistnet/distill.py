"""Distillation toward per-block optimised vectors: closing GistNet's amortisation gap.

One vector optimised for a block's own reconstruction lets the base regenerate most of it (0.70 of a book
block, 0.96 of a code block on the v2 base; docs/results/gistnet_v2.md) while the trained encoder reaches a
third of that gap. This module makes such vectors in bulk (the targets) and gives the loss that pulls
GistNet's gists toward them.

Design choices
- Targets are optimised for the block's reconstruction, ``[BOS][vector][block]`` teacher-forced
  (:func:`megacontext.gistnet.objective.reconstruction_logits`), never for text that follows the block, so a
  target cannot leak a continuation the substitution loss scores.
- The loss is ``1 - cosine(gist, target)``: GistNet's output norm is fixed to the embedding norm (see
  :mod:`megacontext.gistnet.model`), so only the direction is taught; the reconstruction probe showed the
  direction, not the norm, is what separates gists from optimised vectors.
- Storage: safetensors shards ``targets-NNNNN.safetensors`` holding ``blocks`` [n, 32] (int32) and
  ``vectors`` [n, d] (float16), plus ``meta.json`` with the base fingerprint (targets of another base model are
  refused) and how they were made. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.core.lod import BLOCK
from megacontext.gistnet.objective import reconstruction_logits

log = logging.getLogger(__name__)

META = "meta.json"


class TargetError(ValueError):
    """A target directory is missing, damaged, or was made for another base model."""


def optimise_vectors(base: FrozenBase, blocks: Tensor, init: Tensor, steps: int = 300, lr: float = 0.01) -> Tensor:
    """One vector per block [n, d] optimised with Adam (from ``init``) for the block's reconstruction NLL.
    The loss is a sum over blocks, so each vector's update is independent of the rest of its batch."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    vecs = torch.nn.Parameter(init.detach().float().clone())
    opt = torch.optim.Adam([vecs], lr=lr)
    targets = blocks.to(base.device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = reconstruction_logits(base, vecs, targets)  # [n, 32, V]
        F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(-1).sum().backward()
        opt.step()
    return vecs.detach()


def make_targets(base: FrozenBase, blocks: Tensor, out: str | Path, init_fn, steps: int = 300, lr: float = 0.01,
                 batch: int = 1024, shard: int = 65536) -> Path:
    """Optimise targets for ``blocks`` [N, 32] in batches and write them as shards under ``out``.

    ``init_fn(blocks [b, 32]) -> [b, d]`` gives each batch's starting vectors (e.g. the current GistNet)."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK:
        raise ValueError(f"blocks must be [N, {BLOCK}] token ids, got {tuple(blocks.shape)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf_b, buf_v, written, n_shard = [], [], 0, 0
    for i in range(0, blocks.shape[0], batch):
        b = blocks[i:i + batch]
        with torch.no_grad():
            init = init_fn(b.to(base.device)).float()
        with torch.enable_grad():
            v = optimise_vectors(base, b, init, steps, lr)
        buf_b.append(b.to(torch.int32).cpu())
        buf_v.append(v.to(torch.float16).cpu())
        if sum(x.shape[0] for x in buf_b) >= shard or i + batch >= blocks.shape[0]:
            save_file({"blocks": torch.cat(buf_b), "vectors": torch.cat(buf_v)},
                      str(out / f"targets-{n_shard:05d}.safetensors"))
            written += sum(x.shape[0] for x in buf_b)
            n_shard += 1
            buf_b, buf_v = [], []
        log.info("distillation targets: %d / %d blocks", min(i + batch, blocks.shape[0]), blocks.shape[0])
    meta = {"base_fingerprint": base.fingerprint, "d_model": base.d_model, "blocks": written, "shards": n_shard,
            "steps": steps, "lr": lr, "objective": "reconstruction [BOS][vector][block], teacher-forced NLL"}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


class DistillTargets:
    """All target shards of a directory in memory; ``sample(n, gen)`` draws (blocks [n, 32], vectors [n, d])."""

    def __init__(self, directory: str | Path, base: FrozenBase):
        d = Path(directory)
        if not (d / META).is_file():
            raise TargetError(f"{str(d)!r} holds no distillation targets (no {META}); make them with "
                              "benchmarks/gistnet_distill_targets.py")
        meta = json.loads((d / META).read_text())
        if meta.get("base_fingerprint") != base.fingerprint:
            raise TargetError(f"distillation targets in {str(d)!r} were made for base fingerprint "
                              f"{meta.get('base_fingerprint')}, not this base model's {base.fingerprint}")
        shards = sorted(d.glob("targets-*.safetensors"))
        if not shards:
            raise TargetError(f"{str(d)!r} lists {meta.get('shards')} target shards but holds none")
        parts = [load_file(str(p)) for p in shards]
        self.blocks = torch.cat([p["blocks"] for p in parts]).long()  # [N, 32]
        self.vectors = torch.cat([p["vectors"] for p in parts]).float()  # [N, d]
        if self.vectors.shape[1] != base.d_model:
            raise TargetError(f"targets have d={self.vectors.shape[1]}, the base model d={base.d_model}")
        self.meta = meta

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def sample(self, n: int, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self), (n,), generator=gen)
        return self.blocks[idx], self.vectors[idx]


def distill_loss(gists: Tensor, targets: Tensor) -> Tensor:
    """Mean ``1 - cos(gist, target)`` over rows of gists [n, d] and targets [n, d]."""
    return (1.0 - F.cosine_similarity(gists.float(), targets.to(gists.device).float(), dim=-1)).mean()
