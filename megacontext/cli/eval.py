"""``megacontext eval gist`` (substitutability of gists) and ``megacontext eval focus`` (focus policies).

Every flag is generated from the run's config dataclass
(:class:`~megacontext.gistnet.eval.run.GistEvalRunConfig`, :class:`~megacontext.focus.evaluation.FocusRunConfig`);
``--config`` reads a YAML file first and explicit flags override it.

``python -m megacontext.cli.eval gist ...`` runs one command without building the whole CLI (so a GPU run
does not depend on every other command module importing cleanly).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megacontext.cli import config_command
from megacontext.core.config import config_from_args


def cmd_gist(args: argparse.Namespace) -> int:
    from megacontext.gistnet.eval.run import GistEvalRunConfig, run_gist_eval

    cfg = config_from_args(GistEvalRunConfig, args, args.config)
    print(run_gist_eval(cfg, getattr(args, "provenance_argv", None)))
    return 0


def cmd_focus(args: argparse.Namespace) -> int:
    from megacontext.focus.evaluation import FocusRunConfig, run_focus_eval

    report = run_focus_eval(config_from_args(FocusRunConfig, args, args.config))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def register(subparsers) -> None:
    from megacontext.focus.evaluation import FocusRunConfig
    from megacontext.gistnet.eval.run import GistEvalRunConfig

    for name, helptext, cls, func in (
            ("gist", "substitutability of gists vs raw / drop / meanpool (+ cramming bound)", GistEvalRunConfig,
             cmd_gist),
            ("focus", "evaluate focus policies (recency, LensNet, oracle) end to end and on QMSum", FocusRunConfig,
             cmd_focus)):
        config_command(subparsers, name, helptext, cls, func)


def main(argv: list[str] | None = None) -> int:
    """``python -m megacontext.cli.eval gist ...``: this module's commands alone."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m megacontext.cli.eval")
    register(parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True))
    args = parser.parse_args(argv)
    args.provenance_argv = ["python", "-m", "megacontext.cli.eval", *argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
