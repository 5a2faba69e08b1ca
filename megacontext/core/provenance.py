"""Provenance of a benchmark result: the command that produced it, the code commit and the machine.

Every number we publish under docs/results/ carries these three facts, so results stay reproducible
and comparable (a CPU number is never mistaken for an H100 number).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def git_commit(cwd: str | Path | None = None) -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files differ from it; ``unknown`` outside git."""
    cwd = str(cwd or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine(device: torch.device | None = None) -> str:
    """Human-readable compute description, e.g. ``NVIDIA H100 80GB HBM3`` or ``CPU x86_64 (2 cores)``."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.machine()} ({cores} cores)"


def command_line(argv: list[str] | None = None) -> str:
    """The invoking command as a shell-quoted string (``megacontext ...`` when run through the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("megacontext", "cli.py"):
        argv[0] = "megacontext"
    return shlex.join(argv)


def run_info(device: torch.device | None = None, argv: list[str] | None = None) -> dict[str, str]:
    return {
        "command": command_line(argv),
        "commit": git_commit(),
        "machine": machine(device),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
