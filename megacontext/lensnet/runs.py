"""``train lensnet`` as a library call: counterfactual labels for the training documents, then training.

Documents come from ``docs`` paths (:func:`megacontext.data.documents.load_docs`: token caches,
``.safetensors`` token tensors, ``.txt`` files). Every ``holdout_every``-th document (0, k, 2k, ...) is
held out for ``eval focus`` and never labelled for training. Paths are never defaulted to a developer
layout: a run names them (``configs/lensnet.yaml``, ``--docs``).

:func:`run_train` runs under ``torchrun --nproc_per_node=N`` too: rank 0 generates (or completes) the label
cache while the other ranks wait at a barrier, then all ranks train data-parallel
(:func:`megacontext.lensnet.train.train_lensnet`). Labelling is not sharded, and a long labelling pass can
outlast the process group's collective timeout: label in one process first, then launch training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megacontext.core import distributed as D
from megacontext.core.assets import BASE_MODEL
from megacontext.core.config import Config, check
from megacontext.data.documents import load_docs, split_docs
from megacontext.lensnet.labels import LabelConfig, generate_labels
from megacontext.lensnet.train import LensTrainConfig, train_lensnet

log = logging.getLogger(__name__)


@dataclass
class DocRunConfig(Config):
    """What a run over whole documents reads (``train lensnet``, ``eval focus``): the models and the documents,
    split by position into training and held-out shares."""

    base: str = BASE_MODEL  # base model: a directory, an embedded model name or a hub id
    gistnet: str = ""  # GistNet checkpoint directory (or embedded name); empty = mean-pooling gists
    docs: tuple[str, ...] = ()  # document sources (token cache dirs, .safetensors, .txt files or dirs); required
    holdout_every: int = 4  # documents 0, k, 2k, ... are held out for eval focus and never labelled
    device: str = "auto"
    dtype: str = "float32"  # label dNLLs are small differences: keep the base in fp32 (TF32 on GPU)

    def __post_init__(self):
        check(self.holdout_every >= 2, f"holdout_every={self.holdout_every} must be >= 2")
        check(len(self.docs) > 0, "docs=() names no documents: pass --docs PATH ... or set docs in the YAML config")


@dataclass
class LensRunConfig(DocRunConfig):
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: LensTrainConfig = field(default_factory=LensTrainConfig)


def load_models(base_path: str, gistnet: str, device: str, dtype: str):
    """(frozen base, compressor, compressor version): the GistNet checkpoint ``gistnet``, or mean pooling when
    it is empty. TF32 matmuls are enabled (label and evaluation runs are fp32 on GPU)."""
    from megacontext.base import FrozenBase

    torch.backends.cuda.matmul.allow_tf32 = True
    base = FrozenBase.load(base_path, device=device, dtype=dtype)
    if gistnet:
        from megacontext.gistnet.model import GistNet

        comp = GistNet.load(gistnet, base)
        return base, comp, f"gistnet:{comp.weights_hash()}"
    from megacontext.tree.compressor import MeanPoolCompressor

    comp = MeanPoolCompressor.from_base(base)
    return base, comp, comp.version


def run_train(cfg: LensRunConfig) -> dict:
    """Label (rank 0) then train (all ranks); returns {"labels": label stats, "train": final metrics}."""
    info = D.init_distributed(cfg.device)
    D.quiet_non_main_ranks(info)
    try:
        base, comp, version = load_models(cfg.base, cfg.gistnet, D.rank_device(info, cfg.device), cfg.dtype)
        stats: dict = {}
        if info.main:
            docs, names = split_docs(*load_docs(cfg.docs, base.encode), cfg.holdout_every, held_out=False)
            stats = generate_labels(base, comp, docs, cfg.labels, cfg.train.labels, version, names)
            Path(cfg.train.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.train.out) / "label_stats.json").write_text(json.dumps(stats, indent=2))
        D.barrier()  # the label cache is complete before any rank loads it
        metrics = train_lensnet(base, cfg.train, info)
        return {"labels": stats, "train": metrics, "main": info.main}
    finally:
        D.teardown()
