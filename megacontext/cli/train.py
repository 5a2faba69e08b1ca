"""``megacontext train gistnet`` and ``megacontext train lensnet``.

Flags are generated from the run's config dataclass (:class:`~megacontext.gistnet.train.GistTrainConfig`:
``--steps``, ``--model.layers``, ``--objective.dense``, ...; :class:`~megacontext.lensnet.runs.LensRunConfig`:
``--docs``, ``--labels.budgets``, ``--train.steps``, ...); ``--config`` reads a YAML file first and explicit
flags override it. Both work under ``torchrun`` (any N).
"""

from __future__ import annotations

import argparse
import json
import logging

from megacontext.cli import config_command
from megacontext.core.config import config_from_args

log = logging.getLogger(__name__)


def cmd_gistnet(args: argparse.Namespace) -> int:
    from megacontext.gistnet.train import GistTrainConfig, train

    cfg = config_from_args(GistTrainConfig, args, args.config)
    log.info("train gistnet: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    last = train(cfg)
    if last:
        print(json.dumps(last, sort_keys=True))
    return 0


def cmd_lensnet(args: argparse.Namespace) -> int:
    from megacontext.lensnet.runs import LensRunConfig, run_train

    out = run_train(config_from_args(LensRunConfig, args, args.config))
    if out.pop("main"):
        print(json.dumps(out, indent=2))
    return 0


def register(subparsers) -> None:
    from megacontext.gistnet.train import GistTrainConfig
    from megacontext.lensnet.runs import LensRunConfig

    for name, helptext, cls, func in (
            ("gistnet", "train GistNet (substitutability through the frozen base)", GistTrainConfig, cmd_gistnet),
            ("lensnet", "label counterfactual focus utilities and train LensNet", LensRunConfig, cmd_lensnet)):
        config_command(subparsers, name, helptext, cls, func)
