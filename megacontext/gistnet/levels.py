"""Which net makes which level: LOD1 and LOD2 GistNets paired, and what an LOD1-only checkpoint does at LOD2.

Two ways to get LOD2 gists from training (``megacontext train gistnet --level 2``):
- *stacked*: ``--lod1 <frozen LOD1 checkpoint>`` trains a second, usually smaller, GistNet that reads 32 LOD1
  gists of that exact checkpoint. Its checkpoint records ``lod1_weights_hash``; :func:`load_lod2` refuses to
  pair it with any other LOD1 net, because its inputs would come from a different distribution.
- *joint*: no ``--lod1``; one net trained for both levels (its level embedding tells them apart).
A checkpoint trained only at level 1 has an untrained level-2 path: :func:`level2_mode` maps it to mean
pooling of LOD1 gists (the untrained baseline) instead.

:class:`TwoLevelGist` is the pair seen as one GistNet-style callable ``(x [n, 32, d], level) -> [n, d]`` with
the LOD1 net's ``lod1_inputs``: what training-free consumers (``megacontext eval gist``) take.

Levels above 2 (LOD3 = 32,768 tokens, ...; added by the tree as a history grows): a net trained for level
``l`` (``upper[l]``, a stacked net reading 32 LOD``l-1`` gists, run in its level-2 mode) when one is given,
else mean pooling of the 32 LOD``l-1`` gists rescaled to the embedding norm. Mean pooling is the default and
adds nothing to the version tag, so stores made before LOD3 existed keep their compressor version.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from megacontext.base import FrozenBase
from megacontext.core.checkpoint import CheckpointError, read_checkpoint_meta
from megacontext.core.lod import MAX_LEVEL, NET_LEVELS
from megacontext.gistnet.model import GistNet
from megacontext.tree.compressor import mean_pool


def read_lod1_inputs(compressor, base: FrozenBase, ids: Tensor) -> Tensor:
    """ids [n, 32] -> what ``compressor`` reads to make LOD1 gists [n, 32, d]: a tree compressor's ``embed``, a
    GistNet-style ``lod1_inputs`` (token embeddings or base hidden states), else the base's token embeddings
    (mean pooling and other baselines)."""
    if hasattr(compressor, "embed"):
        return compressor.embed(ids)
    if hasattr(compressor, "lod1_inputs"):
        return compressor.lod1_inputs(base, ids)
    return base.embed(ids)


def trained_levels(meta: dict) -> list[int]:
    """Levels a checkpoint was trained for (older checkpoints: from their train config; default [1])."""
    if "levels" in meta:
        return [int(x) for x in meta["levels"]]
    return [int(meta.get("train_config", {}).get("level", 1))]


def level2_mode(directory: str | Path) -> str:
    """``"gistnet"`` when the checkpoint's own level-2 path was trained (jointly), else ``"meanpool"``."""
    meta = read_checkpoint_meta(directory)
    stacked = bool(meta.get("lod1_weights_hash"))
    return "gistnet" if 2 in trained_levels(meta) and not stacked else "meanpool"


def load_lod2(directory: str | Path, lod1: GistNet, base: FrozenBase) -> GistNet:
    """The stacked LOD2 net in ``directory``, checked to have been trained on ``lod1``'s exact gists."""
    meta = read_checkpoint_meta(directory)
    if 2 not in trained_levels(meta):
        raise CheckpointError(f"{str(directory)!r} was trained for level(s) {trained_levels(meta)}, not level 2")
    want, have = meta.get("lod1_weights_hash"), lod1.weights_hash()
    if want is None:
        raise CheckpointError(f"{str(directory)!r} records no lod1_weights_hash: it was not trained on a frozen "
                              "LOD1 checkpoint (train --level 2 --lod1 DIR), so it cannot be paired with one")
    if want != have:
        raise CheckpointError(f"LOD2 checkpoint {str(directory)!r} was trained on LOD1 gists of weights {want}, "
                              f"but the LOD1 net given has weights {have}; pair it with the LOD1 checkpoint it "
                              "was trained on")
    return GistNet.load(directory, base)


class TwoLevelGist(nn.Module):
    """LOD1 gists from ``lod1``, LOD2 gists from ``lod2`` (a GistNet, or None = mean pooling of LOD1 gists);
    levels above 2 from ``upper[level]`` when given, else mean pooling of the level below."""

    def __init__(self, lod1: GistNet, lod2: GistNet | None, upper: dict[int, GistNet] | None = None):
        super().__init__()
        upper = dict(upper or {})
        for level, net in [(2, lod2), *upper.items()]:
            if net is not None and net.d_model != lod1.d_model:
                raise ValueError(f"LOD{level} net d_model={net.d_model} differs from the LOD1 net's {lod1.d_model}")
        if any(not NET_LEVELS < lv <= MAX_LEVEL for lv in upper):
            raise ValueError(f"upper nets are for levels {NET_LEVELS + 1}..{MAX_LEVEL}, got {sorted(upper)}")
        self.lod1, self.lod2 = lod1, lod2
        self.upper = nn.ModuleDict({str(lv): net for lv, net in sorted(upper.items())})
        self.d_model = lod1.d_model

    @classmethod
    def load(cls, lod1_dir: str | Path, base: FrozenBase, lod2_dir: str | Path | None = None) -> TwoLevelGist:
        """``lod2_dir`` None: the LOD1 checkpoint's own level 2 if it was trained, else mean pooling."""
        lod1 = GistNet.load(lod1_dir, base)
        if lod2_dir is not None:
            return cls(lod1, load_lod2(lod2_dir, lod1, base))
        return cls(lod1, lod1 if level2_mode(lod1_dir) == "gistnet" else None)

    @property
    def cfg(self):
        return self.lod1.cfg

    @property
    def embed_norm(self) -> Tensor:
        return self.lod1.embed_norm

    def level2_tag(self) -> str:
        """'' (the LOD1 net's own level 2), ':l2mean' (mean pooling) or ':l2-<hash>' (a stacked LOD2 net)."""
        if self.lod2 is None:
            tag = ":l2mean"
        else:
            tag = "" if self.lod2 is self.lod1 else f":l2-{self.lod2.weights_hash()[:8]}"
        return tag + "".join(f":l{lv}-{net.weights_hash()[:8]}" for lv, net in self.upper.items())

    def lod1_inputs(self, base: FrozenBase, ids: Tensor) -> Tensor:
        return self.lod1.lod1_inputs(base, ids)

    def forward(self, x: Tensor, level: int = 1) -> Tensor:
        """x [n, 32, d] -> [n, d] gists of ``level`` (1..MAX_LEVEL)."""
        if level == 1:
            return self.lod1(x, 1)
        if not 2 <= level <= MAX_LEVEL:
            raise ValueError(f"level={level} must be in 1..{MAX_LEVEL}")
        net = self.lod2 if level == 2 else dict(self.upper.items()).get(str(level))
        if net is not None:
            return net(x, 2)  # a stacked net reads 32 gists of the level below in its level-2 mode
        return mean_pool(x, self.lod1.embed_norm)  # [n, d]
