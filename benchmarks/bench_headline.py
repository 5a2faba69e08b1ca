"""Merge the parts of the headline benchmark (``run_suite.sh headline``) into one report.

The headline runs as three ``megacontext bench`` invocations side by side (probes at chunk 32, perplexity at
chunk 128, LLMLingua at chunk 256), because one invocation with every task at one chunk size does not fit the
10-minute command limit. Each part keeps its own ``results.{json,md}`` and plots; this script writes
``<out>/results.json`` and ``<out>/results.md`` with:

- one summary table per task: every system's overall NLL (95% bootstrap interval over probes or documents)
  at each budget, with passkey top-1 accuracy (all key tokens right) beside its NLL;
- issue 17's target checks, computed from the numbers above, never typed in: ``megacontext`` against BM25
  and truncation on far-recall and passkey NLL at both budgets (mean lower, and whether the intervals are
  disjoint), and the share of the recency -> evidence-oracle gap that ``megacontext`` closes;
- the provenance (command, commit, machine, base fingerprint) of every part, and the parts' full tables.

Invocations whose sample settings are equal (everything in their config but the systems, the output folder
and batching) score the same samples, so they are merged into one part named after the first; their commands
are all listed. Rows of different parts are not mixed within a table: a system that runs in two parts
(truncation, BM25, ``megacontext``) appears once per part, because chunk size changes what is scored.

Usage: ``python benchmarks/bench_headline.py --parts DIR [DIR ...] --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from megacontext.bench.report import fmt_estimate  # noqa: E402

PRIMARY = "megacontext"
RIVALS = ("bm25-absolute", "truncation")
TARGET_TASKS = ("far_recall", "passkey")


# config fields that do not change which samples are scored or how
_NOT_SAMPLE = {"systems", "system_options", "out_dir", "batch_tokens", "device", "dtype", "name"}


def load_part(path: Path) -> dict:
    data = json.loads((path / "results.json").read_text())
    data["name"] = path.name or path.resolve().name
    data["metas"] = [data["meta"]]
    data["own_skipped"] = [data["skipped"]]
    return data


def _sample_key(part: dict) -> str:
    cfg = {k: v for k, v in part["meta"]["config"].items() if k not in _NOT_SAMPLE}
    return json.dumps(cfg, sort_keys=True)


def merge_parts(parts: list[dict]) -> list[dict]:
    """Merge invocations that scored the same samples (see module docstring); a (task, system, budget) scored
    by two of them must agree, else the merge refuses."""
    merged: dict[str, dict] = {}
    for part in sorted(parts, key=lambda p: (len(p["name"]), p["name"])):
        key = _sample_key(part)
        if key not in merged:
            merged[key] = part
            continue
        into = merged[key]
        have = {(r["task"], r["system"], r["w_max"], r["metric"], r["group"]): r["value"] for r in into["rows"]}
        for r in part["rows"]:
            k = (r["task"], r["system"], r["w_max"], r["metric"], r["group"])
            if k in have:
                if not math.isclose(have[k], r["value"], rel_tol=1e-3, abs_tol=1e-3):
                    raise SystemExit(f"parts {into['name']} and {part['name']} disagree on {k}: {have[k]} vs "
                                     f"{r['value']}; they did not score the same samples")
                continue
            into["rows"].append(r)
        into["cost"] += [c for c in part["cost"]
                         if not any((c["task"], c["system"], c["w_max"]) == (d["task"], d["system"], d["w_max"])
                                    for d in into["cost"])]
        into["metas"].append(part["meta"])
        into["own_skipped"].append(part["skipped"])
    for part in merged.values():
        # a system one invocation could not run (a missing package) but another one ran is not "not scored"
        ran = {name for m, skips in zip(part["metas"], part["own_skipped"], strict=True)
               for name in m["config"]["systems"] if not any(s["system"] == name for s in skips)}
        part["skipped"] = [s for skips in part["own_skipped"] for s in skips if s["system"] not in ran]
    return list(merged.values())


def overall(rows: list[dict], task: str, metric: str) -> dict[tuple[str, int], dict]:
    """(system, w_max) -> the row for ``metric`` over all units of ``task``."""
    return {(r["system"], r["w_max"]): r for r in rows
            if r["task"] == task and r["metric"] == metric and r["group"] == "all"}


def _cell(row: dict | None) -> str:
    return "–" if row is None else fmt_estimate(row)


def summary_rows(parts: list[dict]) -> list[dict]:
    out = []
    for part in parts:
        tasks = sorted({r["task"] for r in part["rows"]})
        for task in tasks:
            nll = overall(part["rows"], task, "nll")
            acc = overall(part["rows"], task, "accuracy")
            for (system, w), row in sorted(nll.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                a = acc.get((system, w))
                out.append({"part": part["name"], "task": task, "system": system, "w_max": w, "n": row["n"],
                            "nll": row["value"], "nll_lo": row["lo"], "nll_hi": row["hi"],
                            "accuracy": None if a is None else a["value"],
                            "accuracy_lo": None if a is None else a["lo"],
                            "accuracy_hi": None if a is None else a["hi"]})
    return out


def target_checks(part: dict) -> list[dict]:
    """Issue 17's comparisons on one part that holds ``megacontext`` and its rivals (the probes part)."""
    checks = []
    for task in TARGET_TASKS:
        nll = overall(part["rows"], task, "nll")
        budgets = sorted({w for (_, w) in nll})
        for w in budgets:
            mine = nll.get((PRIMARY, w))
            if mine is None:
                continue
            for rival in RIVALS:
                other = nll.get((rival, w))
                if other is None:
                    continue
                checks.append({"target": f"{PRIMARY} beats {rival} on {task} NLL", "task": task, "w_max": w,
                               "part": part["name"], "mine": mine["value"], "rival": other["value"],
                               "difference": mine["value"] - other["value"],
                               "met": mine["value"] < other["value"],
                               "intervals_disjoint": mine["hi"] < other["lo"] or other["hi"] < mine["lo"]})
            rec, orc = nll.get(("megacontext-recency", w)), nll.get(("megacontext-oracle", w))
            if rec is not None and orc is not None:
                gap = rec["value"] - orc["value"]
                closed = (rec["value"] - mine["value"]) / gap if gap > 1e-9 else float("nan")
                checks.append({"target": f"{PRIMARY} closes >= 0.5 of the recency -> oracle gap on {task}",
                               "task": task, "w_max": w, "part": part["name"], "recency": rec["value"],
                               "oracle": orc["value"], "mine": mine["value"], "gap_closed": closed,
                               "met": bool(math.isfinite(closed) and closed >= 0.5)})
    return checks


def markdown(parts: list[dict], summary: list[dict], checks: list[dict]) -> str:
    lines = ["# Headline benchmark: `megacontext` against the baselines", "",
             "Written by `python benchmarks/bench_headline.py` from the parts of `bash benchmarks/run_suite.sh "
             "headline`. Each part is one `megacontext bench` invocation:", ""]
    for p in parts:
        for m in p["metas"]:
            lines.append(f"- **{p['name']}**: `{m['command']}` · commit `{m['commit']}` · {m['machine']} · base "
                         f"`{m['base_model']}` ({m['base_fingerprint']}, {m['dtype']}) · torch {m.get('torch')} · "
                         f"transformers {m.get('transformers')}")
    lines += ["", "Cells: mean over probes (documents for perplexity) with a 95% bootstrap interval; NLL in "
              "nats/token, lower is better; passkey accuracy = share of probes whose every key token is the "
              "base's top-1.", "", "## Targets (issue 17)", "", "| target | W_max | part | result | met |",
              "|---|---|---|---|---|"]
    for c in checks:
        if "gap_closed" in c:
            res = (f"recency {c['recency']:.3f}, oracle {c['oracle']:.3f}, {PRIMARY} {c['mine']:.3f}: "
                   f"closes {c['gap_closed']:.2f}")
        else:
            res = (f"{c['mine']:.3f} vs {c['rival']:.3f} ({c['difference']:+.3f}; intervals "
                   f"{'disjoint' if c['intervals_disjoint'] else 'overlap'})")
        lines.append(f"| {c['target']} | {c['w_max']} | {c['part']} | {res} | {'yes' if c['met'] else 'no'} |")
    for part in parts:
        rows = [r for r in summary if r["part"] == part["name"]]
        for task in sorted({r["task"] for r in rows}):
            trows = [r for r in rows if r["task"] == task]
            has_acc = any(r["accuracy"] is not None for r in trows)
            lines += ["", f"## {task} ({part['name']} part): overall", "",
                      "| system | W_max | NLL | " + ("top-1 accuracy | " if has_acc else "") + "n |",
                      "|---|---|---|" + ("---|" if has_acc else "") + "---|"]
            for r in trows:
                acc = ""
                if has_acc:
                    acc = "– | " if r["accuracy"] is None else \
                        f"{r['accuracy']:.3f} [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] | "
                nll = {"value": r["nll"], "lo": r["nll_lo"], "hi": r["nll_hi"]}
                lines.append(f"| {r['system']} | {r['w_max']} | {_cell(nll)} | {acc}{r['n']} |")
    skipped = [f"- {p['name']}: {s['system']} ({s['task']}): {s['reason']}" for p in parts for s in p["skipped"]]
    if skipped:
        lines += ["", "## Not scored", ""] + skipped
    lines += ["", "## Per-distance and per-position tables", "",
              "Each part's own report (tables by distance or position, cost per token, plots) is in its folder: "
              + ", ".join(f"[{p['name']}/results.md]({p['name']}/results.md)" for p in parts) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", required=True, help="folders holding a part's results.json")
    ap.add_argument("--out", required=True, help="folder for the merged results.{json,md}")
    args = ap.parse_args(argv)
    parts = merge_parts([load_part(Path(p)) for p in args.parts if (Path(p) / "results.json").exists()])
    missing = [p for p in args.parts if not (Path(p) / "results.json").exists()]
    if not parts:
        raise SystemExit(f"no results.json under any of {args.parts}")
    summary = summary_rows(parts)
    checks = [c for p in parts for c in target_checks(p)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("command", "commit", "machine", "base_model", "base_fingerprint", "dtype", "torch", "transformers")
    payload = {"parts": [{"name": p["name"], "invocations": [{k: m.get(k) for k in keys} for m in p["metas"]],
                          "skipped": p["skipped"]} for p in parts],
               "missing_parts": missing, "targets": checks, "summary": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "results.md").write_text(markdown(parts, summary, checks))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}" + (f"; missing parts: {missing}" if missing else ""))


if __name__ == "__main__":
    main()
