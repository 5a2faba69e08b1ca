"""``megacontext demo``: the README's end-to-end demo on the embedded models (see :mod:`megacontext.demo.run`).

Flags are generated from :class:`~megacontext.demo.run.DemoConfig`; ``--config`` reads a YAML file first.
"""

from __future__ import annotations

import argparse

from megacontext.cli import config_command
from megacontext.core.config import config_from_args


def cmd_demo(args: argparse.Namespace) -> int:
    from megacontext.demo.run import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args, args.config))
    return 0


def register(sub) -> None:
    from megacontext.demo.run import DemoConfig

    p = config_command(sub, "demo", "end-to-end demo on the embedded model: long input, focus, recall", DemoConfig,
                       cmd_demo, description="Ingest a generated ship's log with planted facts and measure recall "
                                             "under MegaContext vs plain truncation at the same window.")
    p.add_argument("--no-reference", dest="reference", action="store_false", default=None,
                   help="skip reading the whole history raw (faster); same as --reference false")
