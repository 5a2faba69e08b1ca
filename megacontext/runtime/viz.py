"""Focus visualisation from a telemetry log: level of detail along the history over refocus steps.

Three renderings of the same data (the ``lod_map`` strings of :mod:`megacontext.runtime.telemetry`):
- :func:`render_png`: a focus map (x = history position in tokens, y = refocus step, colour = LOD; white
  where the history did not exist yet) above utilisation and swap-rate curves. matplotlib, Agg backend.
- :func:`render_html`: a self-contained page (the PNG inlined as base64, the summary and an ASCII
  rendering), so it can be mailed or attached to an issue without its assets.
- :func:`ascii_strip` / :func:`ascii_map`: terminal renderings.

Design choice: when a map has more blocks (or steps) than pixels, a pixel shows the *finest* level
among the blocks it covers, because the interesting thing in a focus map is where detail was kept; an
average would wash out a single raw block in a long history.
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
from megacontext.runtime.telemetry import read_jsonl, summarise

log = logging.getLogger(__name__)

ASCII_CHARS = {0: "#", 1: "=", 2: ".", -1: " "}
LEGEND = "# raw (LOD0)   = LOD1 gist   . LOD2 gist"
ZOOM_STEPS = 24
_COLOURS = ["#ffffff", "#b2182b", "#f4a582", "#d1e5f0"]  # future, LOD0, LOD1, LOD2


def lod_matrix(steps: list[dict], max_rows: int = 600, max_cols: int = 1200) -> tuple[np.ndarray, int, list[int]]:
    """-> (matrix [rows, cols] of levels with -1 = not yet in history, tokens per column, step ids per row).

    Rows are evenly spaced steps; columns pool blocks by the finest level (min over non-missing)."""
    if not steps:
        raise ValueError("no refocus steps to draw (the telemetry log holds no 'step' rows)")
    pick = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), max_rows)).round().astype(int))
    rows = [steps[i] for i in pick]
    n_blocks = max(len(r["lod_map"]) for r in rows)
    n_blocks = max(n_blocks, 1)
    full = np.full((len(rows), n_blocks), -1, dtype=np.int16)
    for i, r in enumerate(rows):
        m = np.frombuffer(r["lod_map"].encode("ascii"), dtype=np.uint8).astype(np.int16) - ord("0")
        full[i, : m.size] = m
    pool = -(-n_blocks // max_cols)  # blocks per column
    cols = -(-n_blocks // pool)
    padded = np.full((len(rows), cols * pool), -1, dtype=np.int16)
    padded[:, :n_blocks] = full
    grouped = padded.reshape(len(rows), cols, pool)
    big = np.where(grouped < 0, 99, grouped).min(axis=2)  # finest existing level per column
    return np.where(big == 99, -1, big), pool * BLOCK, [int(r["step"]) for r in rows]


def ascii_strip(lods: str, width: int = 100) -> str:
    """One line for one ``lod_map`` string, pooled to ``width`` characters (finest level wins)."""
    if not lods:
        return ""
    m = np.frombuffer(lods.encode("ascii"), dtype=np.uint8).astype(np.int16) - ord("0")
    pool = -(-m.size // width)
    cols = -(-m.size // pool)
    padded = np.full(cols * pool, 99, dtype=np.int16)
    padded[: m.size] = m
    finest = padded.reshape(cols, pool).min(axis=1)
    return "".join(ASCII_CHARS[int(v)] for v in finest)


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
    norm = BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5], cmap.N)
    # the whole run, then a zoom on the last steps (where a prompt's refocus shows; the run hides it)
    for ax, rows, label in ((axes[0], steps, title), (axes[1], steps[-ZOOM_STEPS:], f"last {ZOOM_STEPS} steps")):
        mat, tok_per_col, ids = lod_matrix(rows)
        ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                  extent=(0, mat.shape[1] * tok_per_col, ids[-1] + 0.5, ids[0] - 0.5))
        ax.set_ylabel("refocus step")
        ax.set_title(label, fontsize=10)
    axes[1].set_xlabel("history position (tokens)")
    axes[0].legend(handles=[Patch(color=_COLOURS[i + 1], label=f"LOD{i}" + (" (raw)" if i == 0 else " gist"))
                            for i in range(3)], loc="lower left", fontsize=8, framealpha=0.9)
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
    """Read a telemetry JSONL and write ``focus_map.png`` + ``focus_map.html`` into ``out_dir``."""
    steps, _ = read_jsonl(log_path)
    summary = summarise(steps)  # over every session appended to the log, not just the last one
    out_dir = Path(out_dir)
    title = title or f"MegaContext focus map ({Path(log_path).name})"
    return {"png": render_png(steps, out_dir / "focus_map.png", summary, title),
            "html": render_html(steps, out_dir / "focus_map.html", summary, title)}
