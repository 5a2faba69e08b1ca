"""Top-level CLI commands of the runtime: ``ingest``, ``generate``, ``score``, ``inspect``, ``fsck``.

Each command is a thin shell over :mod:`megacontext.api` / :mod:`megacontext.runtime.viz` /
:mod:`megacontext.runtime.fsck`. Engine settings come from :class:`~megacontext.runtime.engine.EngineConfig` as
generated flags (``--k``, ``--focus``, ``--wc.w-max``, ``--allocator.tau-expand``, ...) and only apply when a
store is created: an existing store keeps the settings it was made with, and flags given for one are named in
a warning as ignored. Store settings (``--tree.commit-tokens``, ``--tree.commit-seconds``, ``--tree.durable``,
...) apply to every command that writes (``--tree.gist-dtype`` and ``--tree.checksum-rows`` only at creation).

Durability: ``ingest``, ``score`` and ``generate`` print their result after the memory was flushed, so what a
command reported is on disk; a command killed half-way keeps what its commit interval committed, and the next
command reports what it recovered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from megacontext.core.config import add_config_args, config_dests, config_from_args

log = logging.getLogger(__name__)

_CREATE_ONLY_TREE = ("tree.gist_dtype", "tree.checksum_rows")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _store_args(p: argparse.ArgumentParser, create: bool) -> None:
    from megacontext.tree import TreeConfig

    p.add_argument("store", help="memory store directory")
    p.add_argument("--base", default=None, help="base model directory, embedded model name or hub id (default: the "
                                                "store's, or the embedded base-llama-19m-v2 for a new store)")
    p.add_argument("--gistnet", default=None, help="GistNet checkpoint directory, or 'none' for mean-pooled gists "
                                                   "(default: the store's; for a new store the embedded gistnet-19m-v2 "
                                                   "when it matches the base model)")
    p.add_argument("--lensnet", default=None, help="LensNet checkpoint directory (for --focus lensnet)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--rebuild", action="store_true",
                   help="an existing store made for another base model or GistNet: recompute its gists from the "
                        "stored tokens for the ones given")
    add_config_args(p.add_argument_group("store settings"), TreeConfig, prefix="tree.")
    if create:
        p.add_argument("--gistnet-lod2", default=None,
                       help="LOD2 checkpoint trained on --gistnet (train gistnet --level 2 --lod1 ...), for a new "
                            "store; default: mean-pooled LOD1 gists unless the GistNet trained its own level 2")
        p.add_argument("--config", default=None, help="YAML with EngineConfig fields (for a new store)")
        group = p.add_argument_group("engine settings (new stores only)")
        add_config_args(group, _engine_config_cls())


def _engine_config_cls():
    from megacontext.runtime.engine import EngineConfig

    return EngineConfig


def _tree_config(args):
    from megacontext.tree import TreeConfig

    values = {k[len("tree."):]: v for k, v in vars(args).items() if k.startswith("tree.") and v is not None}
    return TreeConfig.from_dict(values)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _ignored_for_existing(args) -> list[str]:
    """Flags given that only matter when a store is created."""
    dests = [*config_dests(_engine_config_cls()), *_CREATE_ONLY_TREE, "config", "gistnet_lod2"]
    return [_flag(d) for d in dests if getattr(args, d, None) is not None]


def _open(args, create_ok: bool):
    """Open the store, or create it when it does not exist and ``create_ok``."""
    from megacontext.api import ENGINE_FILE, MegaContext

    root = Path(args.store)
    common = dict(lensnet=args.lensnet, device=args.device, dtype=args.dtype, tree=_tree_config(args))
    if (root / ENGINE_FILE).is_file():
        ignored = _ignored_for_existing(args)
        if ignored:
            log.warning("ignored for the existing store %s (it keeps the settings it was created with): %s", root,
                        ", ".join(ignored))
        return MegaContext.open(root, args.base, gistnet=None if args.gistnet == "none" else args.gistnet,
                                rebuild=args.rebuild, **common)
    if not create_ok:
        from megacontext.api import read_engine_meta

        if not root.exists():
            raise FileNotFoundError(f"{root} is not a MegaContext store (run `megacontext ingest {root} FILE` first)")
        read_engine_meta(root)  # the precise reason: not a directory, an incomplete store, ...
    cfg = config_from_args(_engine_config_cls(), args, getattr(args, "config", None))
    gistnet = {None: "auto", "none": None}.get(args.gistnet, args.gistnet)
    lod2 = getattr(args, "gistnet_lod2", None)
    return MegaContext.create(root, args.base, gistnet=gistnet, gistnet_lod2=lod2, config=cfg, **common)


def _read_inputs(files: list[str]) -> str:
    parts = []
    for f in files:
        if f == "-":
            parts.append(sys.stdin.read())
            continue
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"input file {f!r} does not exist")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "".join(parts)


# ---------------------------------------------------------------------- commands
def cmd_ingest(args) -> int:
    text = _read_inputs(args.files)
    with _open(args, create_ok=True) as mc:
        t0 = time.perf_counter()
        n = mc.ingest(text, progress=True)  # durable when it returns (tokenising + append + gists + flush)
        rate = n / max(time.perf_counter() - t0, 1e-9)
        print(f"ingested {n:,} tokens ({rate:,.0f} tokens/s); memory now holds {mc.num_tokens:,} tokens; "
              f"{mc.engine.wc}")
    return 0


def cmd_generate(args) -> int:
    with _open(args, create_ok=False) as mc:
        pieces = mc.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()), stream=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    return 0


def cmd_score(args) -> int:
    import math

    text = _read_inputs(args.files)
    with _open(args, create_ok=False) as mc:
        res = mc.score(text, progress=True)
        v = res.nll[~res.nll.isnan()]
        print(f"scored {v.numel():,} tokens: mean NLL {res.mean_nll:.4f} nats/token, "
              f"perplexity {math.exp(res.mean_nll):.2f}")
    return 0


def cmd_inspect(args) -> int:
    from megacontext.api import TELEMETRY_FILE, read_engine_meta
    from megacontext.runtime.telemetry import read_log, summarise
    from megacontext.runtime.viz import ascii_map, render_log

    root = Path(args.store)
    meta = read_engine_meta(root)
    steps, _ = read_log(root / TELEMETRY_FILE)
    if not steps:
        raise ValueError(f"{root} has no refocus steps in its telemetry yet; ingest something first")
    s = summarise(steps)
    wc = meta["config"]["wc"]
    print(f"store {root}: {meta.get('num_tokens', s['num_tokens']):,} tokens, base {meta['base']['path']}, "
          f"focus {meta['config']['focus']}, w_max {wc['w_max']}")
    print(ascii_map(steps, width=args.width, height=args.height))
    print(f"refocus steps {s['steps']}, expands {s['expands']}, collapses {s['collapses']}, mean swap rate "
          f"{s['mean_swap_rate']:.4f}, mean utilisation {s['mean_utilisation']:.3f} (max {s['max_utilisation']:.3f})")
    print("latency per step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in s["latency_ms_per_step"].items()))
    paths = render_log(root / TELEMETRY_FILE, args.out or root / "inspect")
    print(f"focus map: {paths['png']}\n           {paths['html']}")
    return 0


def cmd_fsck(args) -> int:
    from megacontext.runtime.fsck import check_store, format_report

    report = check_store(args.store)
    print(format_report(report))
    return 0 if report.ok else 1


def register(sub) -> None:
    for name, helptext, description, func, create in (
            ("ingest", "append text files to a memory (created if missing)",
             "Append text to a memory store; creates the store with the given settings.", cmd_ingest, True),
            ("score", "streaming per-token NLL of text under a memory",
             "Score text token by token under the memory (the text is appended to it).", cmd_score, False)):
        p = sub.add_parser(name, help=helptext, description=description)
        _store_args(p, create=create)
        p.add_argument("files", nargs="+", help="text files ('-' = stdin)")
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="continue a prompt from a memory (streams text)",
                       description="Generate from a memory; prompt and output are appended to it.")
    _store_args(p, create=False)
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="focus map of a memory (ASCII, PNG, HTML) and telemetry summary",
                       description="Render the focus map (level of detail along the history over refocus steps).")
    p.add_argument("store", help="memory store directory")
    p.add_argument("--out", default=None, help="where to write focus_map.png/html (default: STORE/inspect)")
    p.add_argument("--width", type=positive_int, default=100, help="ASCII map width")
    p.add_argument("--height", type=positive_int, default=16, help="ASCII map rows")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fsck", help="check every file of a memory for damage (exit 0 clean, 1 damage found)",
                       description="Verify every checksum, token id, gist and engine/telemetry file of a store; "
                                   "changes nothing. Exit code 0: no damage; 1: damage found (listed).")
    p.add_argument("store", help="memory store directory")
    p.set_defaults(func=cmd_fsck)
