"""``megacontext bench --suite NAME``: run a benchmark suite and write its report.

``--suite`` names ``configs/bench_<NAME>.yaml`` (or is a path to a YAML file); any config field can be
overridden with its flag (``--w-max 1024 --systems truncation sinks``). ``--list-systems`` prints what
can run here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megacontext.core.config import add_config_args, config_from_args

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def suite_path(suite: str) -> Path:
    p = Path(suite)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"suite config {suite!r} does not exist")
        return p
    p = CONFIG_DIR / f"bench_{suite}.yaml"
    if not p.is_file():
        known = sorted(f.stem.removeprefix("bench_") for f in CONFIG_DIR.glob("bench_*.yaml"))
        raise FileNotFoundError(f"no suite {suite!r} (looked for {p}); known suites: {known}")
    return p


def run(args: argparse.Namespace) -> int:
    from megacontext.bench.registry import available_systems

    if args.list_systems:
        print("\n".join(available_systems()))
        return 0
    from megacontext.base import FrozenBase
    from megacontext.bench.harness import BenchResult, aggregate, run_systems
    from megacontext.bench.registry import SystemUnavailable, build_system
    from megacontext.bench.report import provenance, write_report
    from megacontext.bench.suite import BenchConfig, build_samples

    flags = {k: v for k, v in vars(args).items() if k not in ("suite", "list_systems", "func", "command", "verbose")}
    cfg = config_from_args(BenchConfig, argparse.Namespace(**flags), str(suite_path(args.suite)))
    base = FrozenBase.load(cfg.base_model, device=cfg.device, dtype=cfg.dtype)
    result = BenchResult()
    systems = []
    for name in cfg.systems:
        try:
            systems.append(build_system(name, base, cfg.options_for(name)))
        except SystemUnavailable as e:
            log.warning("system %s unavailable: %s", name, e)
            result.skipped.append({"system": name, "task": "*", "reason": str(e)})
    tasks = build_samples(cfg, base.encode)
    records = run_systems(base, systems, tasks, cfg.w_max, result)
    aggregate(records, cfg.position_buckets, cfg.n_boot, cfg.seed, result)
    meta = {**provenance(base), "config": cfg.to_dict(), "systems": [s.describe() for s in systems]}
    for path in write_report(result, meta, cfg.out_dir):
        print(path)
    return 0


def register(subparsers) -> None:
    from megacontext.bench.suite import BenchConfig

    p = subparsers.add_parser("bench", help="compare MegaContext with baselines at the same working budget",
                              description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="smoke", help="suite name (configs/bench_<name>.yaml) or a YAML path")
    p.add_argument("--list-systems", action="store_true", help="print the systems that can run here and exit")
    add_config_args(p, BenchConfig)
    p.set_defaults(func=run)
