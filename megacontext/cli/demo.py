"""``megacontext demo``: the README's end-to-end demo on the embedded models (see :mod:`megacontext.demo.run`).

Flags are generated from :class:`~megacontext.demo.run.DemoConfig`; ``--config`` reads a YAML file first.
"""

from __future__ import annotations

import argparse

from megacontext.core.config import add_config_args, config_from_args


def cmd_demo(args: argparse.Namespace) -> int:
    from megacontext.demo.run import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args, args.config))
    return 0


def register(sub) -> None:
    from megacontext.demo.run import DemoConfig

    p = sub.add_parser("demo", help="end-to-end demo on the embedded model: long input, focus, recall",
                       description="Ingest a generated ship's log with planted facts and measure recall under "
                                   "MegaContext vs plain truncation at the same window.")
    p.add_argument("--config", default=None, help="YAML file with DemoConfig fields (flags override it)")
    add_config_args(p, DemoConfig)
    p.add_argument("--no-reference", dest="reference", action="store_false", default=None,
                   help="skip reading the whole history raw (faster); same as --reference false")
    p.set_defaults(func=cmd_demo)
