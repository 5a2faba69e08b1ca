"""MegaContext: unbounded memory for a frozen causal LM at a fixed working-window cost.

The ``megacontext`` command (also ``python -m megacontext``): the root parser and ``main``. Each entry of
:data:`COMMANDS` names a module of this package exposing ``register(subparsers)``; a registered parser
sets ``func(args) -> int``. Grouped commands (``data prepare``, ``train gistnet``, ``eval gist``) register
into their group's sub-parsers. Command modules are imported only when the CLI is built, and nothing in
the library imports this package.

User errors: exit code 2 and one line on stderr, never a traceback (``-v`` shows it): bad flags (argparse,
made one line by :class:`Parser`), and the library's user-facing exceptions (bad values, damaged or busy
stores, files that do not exist or are not what they should be, invalid YAML). ``fsck`` exits 1 when it finds
damage. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from megacontext import __version__
from megacontext.core.config import Config, add_config_args

# (group or "" for top level, module with register(subparsers)); help lists them in this order
COMMANDS: list[tuple[str, str]] = [
    ("data", "megacontext.cli.data"),
    ("train", "megacontext.cli.train"),
    ("eval", "megacontext.cli.eval"),
    ("", "megacontext.cli.demo"),
    ("", "megacontext.cli.runtime"),
    ("", "megacontext.cli.bench"),
    ("", "megacontext.cli.serve"),
]

GROUPS = {
    "data": "prepare corpora into token caches",
    "train": "train GistNet / LensNet",
    "eval": "evaluate gists and focus",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``megacontext ingest: error: argument --k: ... (see ... --help)``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix (reported in one line, exit code 2)."""
    from megacontext.tree import CommitFailedError, StoreBusyError

    return ValueError, OSError, StoreBusyError, CommitFailedError


def config_command(sub, name: str, helptext: str, cls: type[Config], func, description: str | None = None):
    """A sub-command whose flags are generated from config dataclass ``cls``, plus ``--config`` (a YAML file
    of its fields, read first; explicit flags override it). Returns the parser for extra arguments."""
    p = sub.add_parser(name, help=helptext, description=description or helptext)
    p.add_argument("--config", default=None, help=f"YAML file with {cls.__name__} fields (flags override it)")
    add_config_args(p, cls)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="megacontext", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megacontext {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for name, helptext in GROUPS.items():
        if any(g == name for g, _ in COMMANDS):
            gp = top.add_parser(name, help=helptext, description=helptext)
            groups[name] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for group, module in COMMANDS:
        importlib.import_module(module).register(groups[group] if group else top)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("megacontext: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except user_errors() as e:  # one clear line, no traceback
        if args.verbose:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"megacontext: error: {text}", file=sys.stderr)
        return 2
