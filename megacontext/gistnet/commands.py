"""``megacontext train gistnet``: train (or resume) a GistNet against a frozen base model.

Flags are generated from :class:`GistTrainConfig` (``--steps``, ``--model.layers``, ``--objective.dense``, ...);
``--config`` reads a YAML file first and explicit flags override it. Works under ``torchrun`` (any N).
"""

from __future__ import annotations

import argparse
import json
import logging

from megacontext.config import add_config_args, config_from_args

log = logging.getLogger(__name__)


def cmd_train_gistnet(args: argparse.Namespace) -> int:
    from megacontext.gistnet.train import GistTrainConfig, train

    yaml_path = args.config
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("config", "func", "command",
                                                                                   "subcommand", "verbose")})
    cfg = config_from_args(GistTrainConfig, flags, yaml_path)
    log.info("train gistnet: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    last = train(cfg)
    if last:
        print(json.dumps(last, sort_keys=True))
    return 0


def register(subparsers) -> None:
    from megacontext.gistnet.train import GistTrainConfig

    p = subparsers.add_parser("gistnet", help="train GistNet (substitutability through the frozen base)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file with GistTrainConfig fields (flags override it)")
    add_config_args(p, GistTrainConfig)
    p.set_defaults(func=cmd_train_gistnet)
