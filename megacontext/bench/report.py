"""Result files of a benchmark run: ``results.json``, ``results.md`` and PNG plots, all in one directory.

Every file carries its provenance (command, git commit, machine, base-model fingerprint) because numbers
in docs must name where they came from. Plots: NLL vs distance (far recall, passkey; one panel per
budget), NLL vs position bucket (perplexity tasks) and NLL vs budget (overall NLL per task).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
from pathlib import Path

from megacontext.bench.harness import DISTANCE_TASKS, PPL_TASKS, BenchResult
from megacontext.core.provenance import git_commit

log = logging.getLogger(__name__)


def provenance(base, device_note: str | None = None) -> dict:
    import torch
    import transformers

    machine = torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else f"CPU ({platform.machine()})"
    return {"command": " ".join(["megacontext", *sys.argv[1:]]), "commit": git_commit(),
            "machine": device_note or machine, "base_model": base.name, "base_fingerprint": base.fingerprint,
            "dtype": str(base.dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__}


def fmt_estimate(row: dict) -> str:
    """``value [lo, hi]`` of one estimate row (``n/a`` when not finite)."""
    if not math.isfinite(row["value"]):
        return "n/a"
    return f"{row['value']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def _group_key(g: str) -> float:
    if g == "all":
        return math.inf
    return float(g.split("-")[0])


def markdown(result: BenchResult, meta: dict) -> str:
    lines = [f"# Benchmark suite `{meta['config']['name']}`", "",
             f"Command: `{meta['command']}` · commit `{meta['commit']}` · machine: {meta['machine']} · "
             f"base `{meta['base_model']}` ({meta['base_fingerprint']}, {meta['dtype']})", "",
             "Cells: mean over units with a 95% bootstrap interval (units = documents for perplexity, probes "
             "otherwise). NLL in nats/token; lower is better. `full` ignores the budget and exists only while "
             "history fits the native window.", ""]
    tables: dict[tuple[str, str], list[dict]] = {}
    for row in result.rows:
        tables.setdefault((row["task"], row["metric"]), []).append(row)
    for (task, metric), rows in tables.items():
        groups = sorted({r["group"] for r in rows}, key=_group_key)
        label = "position" if task in PPL_TASKS else "distance" if task in DISTANCE_TASKS else "group"
        lines += [f"## {task}: {metric} by {label}", "",
                  "| system | W_max | " + " | ".join(groups) + " | n |", "|---|---|" + "---|" * (len(groups) + 1)]
        cells: dict[tuple[str, int], dict[str, dict]] = {}
        for r in rows:
            cells.setdefault((r["system"], r["w_max"]), {})[r["group"]] = r
        for (system, w), by_group in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            n = by_group.get("all", next(iter(by_group.values())))["n"]
            lines.append(f"| {system} | {w} | " + " | ".join(fmt_estimate(by_group[g]) if g in by_group else "–"
                                                              for g in groups) + f" | {n} |")
        lines.append("")
    lines += ["## Cost per scored token", "", "FLOPs: analytic base-forward FLOPs including every context rebuild "
              "(and LLMLingua's compression passes); ms: wall time on the machine above.", "",
              "| task | system | W_max | GFLOPs/token | ms/token | scored tokens |", "|---|---|---|---|---|---|"]
    for c in result.cost:
        lines.append(f"| {c['task']} | {c['system']} | {c['w_max']} | {c['flops_per_token'] / 1e9:.3f} | "
                     f"{c['ms_per_token']:.4f} | {c['scored_tokens']} |")
    if result.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s['system']} on {s['task']}: {s['reason']}" for s in result.skipped]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], task: str, metric: str, w: int | None):
    out: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        if r["task"] == task and r["metric"] == metric and r["group"] != "all" and (w is None or r["w_max"] == w):
            out.setdefault(r["system"], []).append((_group_key(r["group"]), r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


def plots(result: BenchResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({r["task"] for r in result.rows})
    budgets = sorted({r["w_max"] for r in result.rows})
    for task in tasks:
        if task not in PPL_TASKS and task not in DISTANCE_TASKS:
            continue
        xlabel = "token position (bucket start)" if task in PPL_TASKS else "distance (tokens)"
        fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
        for ax, w in zip(axes[0], budgets, strict=True):
            for system, pts in _series(result.rows, task, "nll", w).items():
                xs = [max(x, 1) for x, _ in pts]
                ys = [r["value"] for _, r in pts]
                err = [[r["value"] - r["lo"] for _, r in pts], [r["hi"] - r["value"] for _, r in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=system)
            ax.set_xscale("log")
            ax.set(title=f"{task}, W_max={w}", xlabel=xlabel, ylabel="NLL (nats/token)")
            ax.legend(fontsize=8)
        path = out_dir / f"{task}_nll_vs_{'position' if task in PPL_TASKS else 'distance'}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if len(budgets) > 1:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            per_system: dict[str, list[dict]] = {}
            for r in result.rows:
                if r["task"] == task and r["metric"] == "nll" and r["group"] == "all":
                    per_system.setdefault(r["system"], []).append(r)
            for system, rs in per_system.items():
                rs = sorted(rs, key=lambda r: r["w_max"])
                ax.errorbar([r["w_max"] for r in rs], [r["value"] for r in rs], marker="o", capsize=3, label=system,
                            yerr=[[r["value"] - r["lo"] for r in rs], [r["hi"] - r["value"] for r in rs]])
            ax.set(title=task, xlabel="W_max (tokens)", ylabel="NLL (nats/token)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "nll_vs_budget.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(result: BenchResult, meta: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": result.rows, "cost": result.cost, "skipped": result.skipped}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = markdown(result, meta)
    (out / "results.md").write_text(md)
    files = [out / "results.json", out / "results.md", *plots(result, out)]
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return files
