"""The full check of a store directory (``megacontext fsck STORE``): the tree (every checksum chunk, every token
id, every gist; :func:`megacontext.tree.integrity.check_tree`), the engine state (``engine.json``'s checksum,
``wc.safetensors``' digest and that its tiling is legal for the tree) and the telemetry logs (every line
parses and matches its CRC). Reads everything, changes nothing, reports every problem it finds.

A problem is damage: the named file cannot be trusted (open refuses it, or a read of the damaged part
would). A note is a state a healthy store can be in (an interrupted commit's leftovers, a store made before
checksums, a working context older than the tree after a crash).
"""

from __future__ import annotations

from pathlib import Path

from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.persist import ENGINE_FILE, TELEMETRY_FILE, WC_FILE, StoreError, read_engine_meta, read_wc
from megacontext.runtime.telemetry import read_log
from megacontext.tree.integrity import IntegrityReport, check_tree
from megacontext.tree.layout import read_meta
from megacontext.wc import WorkingContext, WorkingContextError


def _tree_tokens(root: Path) -> int | None:
    try:
        meta = read_meta(root)
    except ValueError:
        return None
    return int(meta.get("num_blocks", 0)) * 32 + len(meta.get("tail", []))


def check_store(store: str | Path) -> IntegrityReport:
    """Check every file of the store at ``store``; raises StoreError only when it is no store at all."""
    root = Path(store)
    if not root.is_dir():
        raise StoreError(f"store {str(root)!r} does not exist or is not a directory")
    if not (root / ENGINE_FILE).exists() and not (root / "meta.json").exists():
        raise StoreError(f"{str(root)!r} is not a MegaContext store (no {ENGINE_FILE}, no meta.json)")
    report = check_tree(root)
    meta = None
    try:
        meta = read_engine_meta(root)
        report.checked.append(f"{ENGINE_FILE}: " + ("checksum ok" if "checksum" in meta else "no checksum (older)"))
    except StoreError as e:
        report.problems.append(str(e))
    wc_cfg = None
    if meta is not None:
        try:
            wc_cfg = EngineConfig.from_dict(meta["config"]).wc
        except (ValueError, TypeError) as e:
            report.problems.append(f"{root / ENGINE_FILE}: bad config ({e})")
    if not (root / WC_FILE).exists():
        report.notes.append(f"{WC_FILE}: missing (the next open rebuilds the working context by recency)")
    else:
        try:
            tensors = read_wc(root)
            tokens = _tree_tokens(root)
            held = int(tensors["num_tokens"][0])
            if wc_cfg is not None:
                WorkingContext.from_state_dict(wc_cfg, tensors)
            if tokens is not None and held > tokens:
                report.problems.append(f"{root / WC_FILE}: covers {held} tokens, the tree holds {tokens}")
            elif tokens is not None and held < tokens:
                report.notes.append(f"{WC_FILE}: covers {held} of the tree's {tokens} tokens (synced on open)")
            report.checked.append(f"{WC_FILE}: a legal tiling of {held} tokens")
        except StoreError as e:
            report.problems.append(str(e))
        except WorkingContextError as e:
            report.problems.append(f"{root / WC_FILE}: not a legal tiling ({e})")
    log = root / TELEMETRY_FILE
    logs = sorted(root.glob("telemetry*.jsonl"))
    if logs:
        try:
            steps, _ = read_log(log, report.notes)
            report.checked.append(f"telemetry: {len(logs)} file(s), {len(steps)} records")
        except (ValueError, OSError) as e:
            report.problems.append(f"{e}")
    elif meta is not None and int(meta.get("step", 0)) > 0 and \
            meta.get("config", {}).get("telemetry", {}).get("enabled", True):
        report.problems.append(f"{log}: missing, but the store has made {meta['step']} refocus steps with "
                               "telemetry on")
    return report


def format_report(report: IntegrityReport) -> str:
    lines = [f"{report.root}: " + ("no damage found" if report.ok else f"DAMAGE FOUND ({len(report.problems)} "
                                                                         "problem(s))")]
    lines += [f"  problem: {p}" for p in report.problems]
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  checked: {c}" for c in report.checked]
    return "\n".join(lines)
