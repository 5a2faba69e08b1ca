"""One markdown row per GistNet v2 variant from its ``gist_eval_<variant>.json`` and ``metrics.jsonl``.

    python benchmarks/gistnet_v2_summary.py EXPORT_DIR subst copy recon copy_recon

EXPORT_DIR/<variant>/ holds what ``benchmarks/gistnet_v2.sh`` exported: the evaluation JSON and the training
metrics. Columns: training steps, final gist similarity (collapse detector), then per domain the LOD1 gap
recovered (896 of 1024 gisted), the copy probe, the wrong-gist control on the copy probe, and the
reconstruction accuracy from one gist next to its wrong-gist control and the crammed bound.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETTING = "lod1-896of1024"


def _est(d: dict | None) -> str:
    return "n/a" if not d else f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _gap(summary: dict, probe: str, variant: str) -> dict | None:
    return summary.get(probe, {}).get(SETTING, {}).get("variants", {}).get(variant, {}).get("gap_recovered")


def _recon(summary: dict, variant: str) -> dict | None:
    return summary.get("recon", {}).get("lod1-block", {}).get(variant, {}).get("acc")


def rows(export: Path, variants: list[str]) -> list[str]:
    out = ["| variant | steps | gist cos | domain | LOD1 gap (896/1024) | copy probe | copy, wrong gist | "
           "recon acc | recon, wrong gist | recon, crammed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        report = json.loads((export / v / f"gist_eval_{v}.json").read_text())
        metrics = [json.loads(x) for x in (export / v / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-1]
        cos = next((m["gist_cos"] for m in reversed(metrics) if "gist_cos" in m), None)
        for dom, summary in report["summary"].items():
            out.append(f"| {v} | {last['step']} | {'n/a' if cos is None else f'{cos:.3f}'} | {dom} | "
                       f"{_est(_gap(summary, 'horizon', 'gist'))} | {_est(_gap(summary, 'copy', 'gist'))} | "
                       f"{_est(_gap(summary, 'copy', 'gist_wrong'))} | {_est(_recon(summary, 'gist'))} | "
                       f"{_est(_recon(summary, 'gist_wrong'))} | {_est(_recon(summary, 'cram'))} |")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print("\n".join(rows(Path(argv[0]), argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
