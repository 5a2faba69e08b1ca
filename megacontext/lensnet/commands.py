"""CLI: ``megacontext train lensnet`` (labels, then training) and ``megacontext eval focus``.

Documents come from ``docs`` paths: a token-cache directory (``index.json``), a ``.safetensors`` file of 1-D
token tensors (how small document sets travel to a GPU machine), or ``.txt`` files / directories of them
(tokenised with the base model's tokenizer). Every ``holdout_every``-th document (0, k, 2k, ...) is held
out for ``eval focus`` and never labelled for training.

``train lensnet`` runs under ``torchrun --nproc_per_node=N`` too: rank 0 generates (or completes) the label
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

from megacontext import distributed as D
from megacontext.config import Config, add_config_args, check, config_from_args
from megacontext.lensnet.focus_eval import FocusEvalConfig, end_to_end, qmsum_eval, qmsum_items
from megacontext.lensnet.labels import LabelConfig, LabelSet, generate_labels
from megacontext.lensnet.train import LensTrainConfig, evaluate, target_scale, train_lensnet

log = logging.getLogger(__name__)


@dataclass
class LensRunConfig(Config):
    base: str = "models/base-llama-19m"
    gistnet: str = ""  # GistNet checkpoint directory; empty = mean-pooling gists
    docs: tuple[str, ...] = ("../shared/data/books/dev",)
    holdout_every: int = 4
    device: str = "auto"
    dtype: str = "float32"  # label dNLLs are small differences: keep the base in fp32 (TF32 on GPU)
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: LensTrainConfig = field(default_factory=LensTrainConfig)

    def __post_init__(self):
        check(self.holdout_every >= 2, f"holdout_every={self.holdout_every} must be >= 2")


@dataclass
class FocusRunConfig(Config):
    base: str = "models/base-llama-19m"
    gistnet: str = ""
    lensnet: str = "models/lensnet-19m"  # empty = recency and oracle only
    docs: tuple[str, ...] = ("../shared/data/books/dev",)
    holdout_every: int = 4
    qmsum: str = "../shared/data/dialogue/qmsum/test"  # empty = skip
    labels: str = ""  # a held-out label cache for Spearman (empty = skip)
    out: str = "runs/lensnet/focus_eval.json"
    device: str = "auto"
    dtype: str = "float32"
    eval: FocusEvalConfig = field(default_factory=FocusEvalConfig)


def load_docs(paths, base) -> tuple[list[torch.Tensor], list[str]]:
    from safetensors.torch import load_file

    docs, names = [], []
    for p in map(Path, paths):
        if (p / "index.json").is_file():
            from megacontext.data.token_cache import TokenCache

            cache = TokenCache.open(p)
            for i in range(cache.num_docs):
                docs.append(torch.from_numpy(cache.doc_tokens(i).astype("int64")))
                names.append(cache.doc_ids[i])
        elif p.suffix == ".safetensors":
            tensors = load_file(str(p))
            for k in sorted(tensors):
                docs.append(tensors[k].long())
                names.append(k)
        elif p.exists():
            files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
            for f in files:
                docs.append(torch.tensor(base.encode(f.read_text(errors="replace")), dtype=torch.long))
                names.append(f.stem)
        else:
            raise FileNotFoundError(f"document source {str(p)!r} does not exist (token cache dir, .safetensors "
                                    "of token tensors, or .txt files expected)")
    return docs, names


def split_docs(docs, names, every: int, held_out: bool):
    keep = [i for i in range(len(docs)) if (i % every == 0) == held_out]
    return [docs[i] for i in keep], [names[i] for i in keep]


def _setup(cfg, device=None):
    from megacontext.base import FrozenBase

    torch.backends.cuda.matmul.allow_tf32 = True
    base = FrozenBase.load(cfg.base, device=device or cfg.device, dtype=cfg.dtype)
    if cfg.gistnet:
        from megacontext.gistnet.model import GistNet

        comp = GistNet.load(cfg.gistnet, base)
        version = f"gistnet:{comp.weights_hash()}"
    else:
        from megacontext.tree.compressor import MeanPoolCompressor

        comp = MeanPoolCompressor.from_base(base)
        version = comp.version
    return base, comp, version


def cmd_train(args) -> int:
    cfg = config_from_args(LensRunConfig, args, args.config)
    info = D.init_distributed(cfg.device)
    D.quiet_non_main_ranks(info)
    try:
        base, comp, version = _setup(cfg, D.rank_device(info, cfg.device))
        stats: dict = {}
        if info.main:
            docs, names = split_docs(*load_docs(cfg.docs, base), cfg.holdout_every, held_out=False)
            stats = generate_labels(base, comp, docs, cfg.labels, cfg.train.labels, version, names)
            Path(cfg.train.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.train.out) / "label_stats.json").write_text(json.dumps(stats, indent=2))
        D.barrier()  # the label cache is complete before any rank loads it
        metrics = train_lensnet(base, cfg.train, info)
        if info.main:
            print(json.dumps({"labels": stats, "train": metrics}, indent=2))
    finally:
        D.teardown()
    return 0


def cmd_eval(args) -> int:
    cfg = config_from_args(FocusRunConfig, args, args.config)
    base, comp, _ = _setup(cfg)
    lens, scale, report = None, 1.0, {"config": cfg.to_dict()}
    if cfg.lensnet:
        from megacontext.lensnet.model import LensNet
        from megacontext.lensnet.policy import LensPolicy

        net, meta = LensNet.load(cfg.lensnet, base)
        lens, scale = LensPolicy(net, base), float(meta.get("target_scale", 1.0))
        if cfg.labels:
            labels = LabelSet.load(cfg.labels)
            report["ranking"] = evaluate(net, base, labels, scale, LensTrainConfig().loss)
            report["ranking"]["contexts"] = len(labels)
    docs, _ = split_docs(*load_docs(cfg.docs, base), cfg.holdout_every, held_out=True)
    report["end_to_end"] = end_to_end(base, comp, docs, lens, scale if lens else _oracle_scale(cfg), cfg.eval)
    if cfg.qmsum:
        from megacontext.data.qmsum import read_qmsum

        items = qmsum_items(base, read_qmsum([cfg.qmsum]), cfg.eval.qmsum_queries)
        report["qmsum"] = qmsum_eval(base, comp, items, lens, cfg.eval)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def _oracle_scale(cfg: FocusRunConfig) -> float:
    """Without a LensNet, express the oracle in the label cache's units when one is given, else nats."""
    return target_scale(LabelSet.load(cfg.labels)) if cfg.labels else 1.0


def _parser(sub, name, helptext, cls, func):
    p = sub.add_parser(name, help=helptext, description=helptext)
    p.add_argument("--config", default=None, help="YAML file (CLI flags override it)")
    add_config_args(p, cls)
    p.set_defaults(func=func)
    return p


def register_train(sub) -> None:
    _parser(sub, "lensnet", "label counterfactual focus utilities and train LensNet", LensRunConfig, cmd_train)


def register_eval(sub) -> None:
    _parser(sub, "focus", "evaluate focus policies (recency, LensNet, oracle) end to end and on QMSum",
            FocusRunConfig, cmd_eval)
