"""Focus visualisation from a telemetry log: level of detail along the history over refocus steps.

Three renderings of the same data (the focus maps of :mod:`megacontext.runtime.telemetry`: run-length
``focus`` strings, or the ``lod_map`` strings of logs written before them; rows without a map are skipped):
- :func:`render_png`: a focus map (x = history position in tokens, y = refocus step, colour = LOD; white
  where the history did not exist yet) above utilisation and swap-rate curves. matplotlib, Agg backend.
- :func:`render_html`: a self-contained page (the PNG inlined as base64, the summary and an ASCII
  rendering), so it can be mailed or attached to an issue without its assets.
- :func:`ascii_strip` / :func:`ascii_map`: terminal renderings.

Design choice: when a map has more blocks (or steps) than pixels, a pixel shows the *finest* level
among the blocks it covers, because the interesting thing in a focus map is where detail was kept; an
average would wash out a single raw block in a long history. Pooling works on the runs directly
(:func:`pooled_levels`), so drawing a 100M-token history never expands it to one value per block.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np

from megacontext.core.lod import BLOCK
from megacontext.runtime.focus_map import row_runs
from megacontext.runtime.telemetry import read_log, summarise

log = logging.getLogger(__name__)

ASCII_CHARS = {0: "#", 1: "=", 2: ".", -1: " ", **{lv: "," for lv in range(3, 9)}}
LEGEND = "# raw (LOD0)   = LOD1 gist   . LOD2 gist   , LOD3+ gist"
ZOOM_STEPS = 24
# future, LOD0, LOD1, LOD2, LOD3, ... LOD8
_COLOURS = ["#ffffff", "#b2182b", "#f4a582", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061", "#222222",
            "#000000"]


def pooled_levels(levels: np.ndarray, blocks: np.ndarray, cols: int, pool: int) -> np.ndarray:
    """The finest level in each of ``cols`` columns of ``pool`` blocks, from runs (levels [R], blocks [R]);
    -1 where a column lies past the history. O(levels present x (R + cols)), never O(blocks)."""
    out = np.full(cols, -1, dtype=np.int16)
    if levels.size == 0:
        return out
    ends = np.cumsum(blocks)  # [R]
    starts = ends - blocks
    edges = np.minimum(np.arange(cols + 1, dtype=np.int64) * pool, ends[-1])  # column boundaries in blocks
    run = np.minimum(np.searchsorted(ends, edges, side="right"), levels.size - 1)  # run holding each edge
    for v in sorted(set(levels.tolist()), reverse=True):  # coarse to fine: finer levels overwrite
        fine = (levels <= v).astype(np.int64)
        before = np.r_[0, np.cumsum(fine * blocks)]  # blocks at levels <= v before each run
        upto = before[run] + np.clip(edges - starts[run], 0, blocks[run]) * fine[run]  # [cols + 1]
        out[np.diff(upto) > 0] = v
    return out


def lod_matrix(steps: list[dict], max_rows: int = 600, max_cols: int = 1200) -> tuple[np.ndarray, int, list[int]]:
    """-> (matrix [rows, cols] of levels with -1 = not yet in history, tokens per column, step ids per row).

    Rows are evenly spaced among the steps that carry a focus map; columns pool blocks by the finest level."""
    mapped = [(r, runs) for r in steps if (runs := row_runs(r)) is not None]
    if not mapped:
        raise ValueError("no refocus steps to draw (the telemetry log holds no 'step' rows with a focus map)")
    pick = np.unique(np.linspace(0, len(mapped) - 1, min(len(mapped), max_rows)).round().astype(int))
    rows = [mapped[i] for i in pick]
    n_blocks = max(max(int(runs[1].sum()) for _, runs in rows), 1)
    pool = -(-n_blocks // max_cols)  # blocks per column
    cols = -(-n_blocks // pool)
    mat = np.stack([pooled_levels(lv, nb, cols, pool) for _, (lv, nb) in rows])
    return mat, pool * BLOCK, [int(r["step"]) for r, _ in rows]


def ascii_strip(row: dict | str, width: int = 100) -> str:
    """One line for one focus map (a JSONL row, or an old ``lod_map`` string), pooled to ``width`` characters
    (finest level wins)."""
    runs = row_runs({"lod_map": row} if isinstance(row, str) else row)
    if runs is None or not runs[1].sum():
        return ""
    n = int(runs[1].sum())
    pool = -(-n // width)
    return "".join(ASCII_CHARS[int(v)] for v in pooled_levels(*runs, -(-n // pool), pool))


def ascii_map(steps: list[dict], width: int = 100, height: int = 16) -> str:
    """A few evenly spaced steps as ASCII strips, left-aligned on one token scale."""
    mat, tok_per_col, ids = lod_matrix(steps, max_rows=height, max_cols=width)
    lines = [f"focus map: {tok_per_col} tokens per column, {LEGEND}"]
    for sid, row in zip(ids, mat, strict=True):
        ntok = next(s["num_tokens"] for s in steps if s["step"] == sid)
        lines.append(f"step {sid:>6} {ntok:>8} tok |" + "".join(ASCII_CHARS[int(v)] for v in row))
    return "\n".join(lines)


def _figure(steps: list[dict], summary: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(4, 1, figsize=(11, 10.5), gridspec_kw={"height_ratios": [4, 1.6, 1.1, 1.1]},
                             constrained_layout=True)
    cmap = ListedColormap(_COLOURS)
    norm = BoundaryNorm([v - 0.5 for v in range(-1, len(_COLOURS))], cmap.N)
    # the whole run, then a zoom on the last steps (where a prompt's refocus shows; the run hides it)
    mapped = [r for r in steps if row_runs(r) is not None]
    top = 2
    for ax, rows, label in ((axes[0], mapped, title), (axes[1], mapped[-ZOOM_STEPS:], f"last {ZOOM_STEPS} maps")):
        mat, tok_per_col, ids = lod_matrix(rows)
        top = max(top, int(mat.max()))
        ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                  extent=(0, mat.shape[1] * tok_per_col, ids[-1] + 0.5, ids[0] - 0.5))
        ax.set_ylabel("refocus step")
        ax.set_title(label, fontsize=10)
    axes[1].set_xlabel("history position (tokens)")
    axes[0].legend(handles=[Patch(color=_COLOURS[i + 1], label=f"LOD{i}" + (" (raw)" if i == 0 else " gist"))
                            for i in range(top + 1)], loc="lower left", fontsize=8, framealpha=0.9)
    x = [s["step"] for s in steps]
    axes[2].plot(x, [s["wc_cost"] for s in steps], lw=1, label="WC cost")
    axes[2].axhline(steps[-1]["w_max"], color="k", ls="--", lw=0.8, label="W_max")
    axes[2].set_ylabel("slots")
    axes[2].legend(loc="lower right", fontsize=8)
    axes[3].plot(x, [s["swap_rate"] for s in steps], lw=0.8, color="tab:purple")
    axes[3].set_ylabel("swap rate")
    axes[3].set_xlabel("refocus step")
    fig.suptitle(f"{summary['num_tokens']} tokens, {summary['steps']} refocus steps, "
                 f"{summary['expands']} expands / {summary['collapses']} collapses, "
                 f"mean utilisation {summary['mean_utilisation']:.2f}", fontsize=9)
    return fig


def render_png(steps: list[dict], path: str | Path, summary: dict | None = None, title: str = "focus map") -> Path:
    import matplotlib.pyplot as plt

    fig = _figure(steps, summary or summarise(steps), title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_html(steps: list[dict], path: str | Path, summary: dict | None = None, title: str = "focus map") -> Path:
    import matplotlib.pyplot as plt

    summary = summary or summarise(steps)
    fig = _figure(steps, summary, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode("ascii")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:1em auto}}pre{{font-size:11px;line-height:1.1}}
table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:2px 8px;font-family:monospace}}</style></head>
<body><h1>{html.escape(title)}</h1>
<img alt="focus map" src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Summary</h2><table>{"".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                                   for k, v in summary.items())}</table>
<h2>ASCII focus map</h2><pre>{html.escape(ascii_map(steps, width=120, height=24))}</pre>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def render_log(log_path: str | Path, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Read a telemetry JSONL (and its rotated predecessors) and write ``focus_map.png`` + ``focus_map.html``."""
    steps, _ = read_log(log_path)
    summary = summarise(steps)  # over every session appended to the log, not just the last one
    out_dir = Path(out_dir)
    title = title or f"MegaContext focus map ({Path(log_path).name})"
    return {"png": render_png(steps, out_dir / "focus_map.png", summary, title),
            "html": render_html(steps, out_dir / "focus_map.html", summary, title)}
