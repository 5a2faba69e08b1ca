"""Engine speed (issue 19): plain HF vs MegaContext (recency and learned focus), same base, text and W_max.

    python benchmarks/engine_speed.py --device cuda --history-tokens 60000 --w-max 2048 \
        --out docs/results/engine_speed
    python benchmarks/engine_speed.py --device cpu --history-tokens 12000 --w-max 1024 --score-tokens 256 \
        --new-tokens 32 --out docs/results/engine_speed_cpu

Measured, each after a warm-up, as the median of ``--reps`` repetitions:
- plain ``generate_tok_s``: HF ``model.generate`` (greedy, KV cache) of ``--new-tokens`` tokens from the last
  ``w_max - new_tokens`` tokens of history + scored text + prompt;
- plain ``score_tok_s``: windowed scoring, one forward of the last ``w_max`` tokens per 32 new tokens;
- MegaContext ``ingest_tok_s`` (``MegaContext.ingest`` of the history into a fresh non-durable store, GistNet on),
  ``score_tok_s`` (``score`` of the next ``--score-tokens`` tokens; includes the focus rounds that settle the
  WC after the lazy ingest) and ``generate_tok_s`` (``generate_ids`` after the prompt, greedy, prompt ingest
  and focus rounds included), for the recency focus and the learned focus (LensNet).
Writes ``OUT.json`` (keys ``machine``, ``command``, ``commit``, ``plain``, ``megacontext.recency``,
``megacontext.learned``, plus settings and every repetition) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from megacontext.api import MegaContext
from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL, LENSNET_MODEL, resolve
from megacontext.core.provenance import git_commit, machine
from megacontext.demo.input import ships_log
from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.sampling import SamplingConfig
from megacontext.wc.working_context import WorkingContextConfig

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("engine_speed")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev: torch.device, fn) -> tuple[float, object]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t0, out


def _text_ids(base: FrozenBase, args) -> torch.Tensor:
    need = args.history_tokens + args.score_tokens + 64
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        ids = base.encode(text)
    else:  # the demo's generated ship's log: deterministic, offline
        ids = base.encode(ships_log(6 * need, seed=1)[0])
    if len(ids) < need:
        raise SystemExit(f"the text has {len(ids):,} tokens; need {need:,} (history + score tokens + prompt)")
    return torch.tensor(ids[:need], dtype=torch.long)


@torch.no_grad()
def plain_rep(base: FrozenBase, ids: torch.Tensor, args) -> dict:
    """Plain HF, one repetition: windowed scoring and greedy generate over the last w_max tokens."""
    dev, w, h, s = base.device, args.w_max, args.history_tokens, args.score_tokens
    model = base.model

    def score():
        for end in range(h + 32, h + s + 1, 32):
            x = ids[max(end - w, 0):end].to(dev)[None]
            model(input_ids=x, logits_to_keep=33)

    ctx = ids[max(h + s + 32 - (w - args.new_tokens), 0):h + s + 32].to(dev)[None]

    def gen():
        return model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=0)

    return {"score_tok_s": s / _timed(dev, score)[0], "generate_tok_s": args.new_tokens / _timed(dev, gen)[0]}


def mc_rep(base: FrozenBase, ids: torch.Tensor, args, focus: str, store: Path, n_hist: int) -> dict:
    """MegaContext, one repetition in a fresh store: ingest the history, score the next tokens, generate."""
    dev, h, s = base.device, args.history_tokens, args.score_tokens
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=args.w_max, recent_raw=128), focus=focus,
                       fast_decode=args.fast_decode)
    lens = resolve(args.lensnet) if focus == "lensnet" else None
    prompt = ids[h + s:h + s + 32]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_tokens=())
    with MegaContext.create(store, base, config=cfg, lensnet=lens, durable=False) as mc:
        t_in, _ = _timed(dev, partial(mc.ingest, ids[:n_hist]))
        t_sc, _ = _timed(dev, partial(mc.score, ids[h:h + s]))
        t_ge, out = _timed(dev, lambda: list(mc.generate_ids(prompt, sampling)))
        stats = dict(mc.engine.read_stats)
        timer = {k: round(v, 1) for k, v in mc.engine.timer.totals.items()}
    return {"ingest_tok_s": n_hist / t_in, "score_tok_s": s / t_sc, "generate_tok_s": len(out) / t_ge,
            "generated": len(out), "read_stats": stats, "stage_ms": timer}


def run_all(base: FrozenBase, ids: torch.Tensor, args, work: Path) -> tuple[dict, dict]:
    """Rep 0 warms up (a short history); then the systems take turns each repetition, so load drifts on a
    shared machine hit them alike. Returns (plain, megacontext) with medians and every repetition."""
    reps: dict[str, list[dict]] = {"plain": [], "recency": [], "learned": []}
    for rep in range(args.reps + 1):
        n_hist = min(args.history_tokens, 4096) if rep == 0 else args.history_tokens
        rows = {"plain": plain_rep(base, ids, args),
                "recency": mc_rep(base, ids, args, "recency", work / f"recency-{rep}", n_hist),
                "learned": mc_rep(base, ids, args, "lensnet", work / f"learned-{rep}", n_hist)}
        for name, row in rows.items():
            log.info("rep %d %s: %s", rep, name, {k: round(v) for k, v in row.items() if k.endswith("tok_s")})
            if rep:
                reps[name].append(row)

    def med(rows: list[dict]) -> dict:
        keys = [k for k in rows[0] if k.endswith("tok_s")]
        return {**{k: statistics.median(r[k] for r in rows) for k in keys}, "reps": rows}

    return med(reps["plain"]), {"recency": med(reps["recency"]), "learned": med(reps["learned"])}


def report(res: dict) -> str:
    p, rec, lrn = res["plain"], res["megacontext"]["recency"], res["megacontext"]["learned"]

    def row(name, d):
        cells = [f"{d.get('ingest_tok_s', float('nan')):,.0f}" if "ingest_tok_s" in d else "-",
                 f"{d['score_tok_s']:,.0f}", f"{d['score_tok_s'] / p['score_tok_s']:.2f}",
                 f"{d['generate_tok_s']:,.1f}", f"{d['generate_tok_s'] / p['generate_tok_s']:.2f}"]
        return f"| {name} | " + " | ".join(cells) + " |"

    s = res["settings"]
    return "\n".join([
        f"# Engine speed: plain HF vs MegaContext ({s['base']}, W_max {s['w_max']}, {s['history_tokens']:,}-token "
        "history)", "",
        f"- command: `{res['command']}`", f"- commit: `{res['commit']}`; machine: {res['machine']}",
        f"- medians of {s['reps']} repetitions after a warm-up (the systems take turns in each repetition); "
        f"score = {s['score_tokens']} tokens after the "
        f"history, generate = {s['new_tokens']} greedy tokens after a 32-token prompt; text: {s['text']}", "",
        "| system | ingest tok/s | score tok/s | score vs plain | generate tok/s | generate vs plain |",
        "|---|---:|---:|---:|---:|---:|",
        row("plain HF (windowed score / `generate`)", p), row("MegaContext, recency", rec),
        row("MegaContext, learned (LensNet)", lrn), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="base dtype (default: the model's)")
    ap.add_argument("--base", default=BASE_MODEL)
    ap.add_argument("--lensnet", default=LENSNET_MODEL)
    ap.add_argument("--text", default="", help="a UTF-8 text file; default: the demo's generated ship's log")
    ap.add_argument("--history-tokens", type=int, default=60_000)
    ap.add_argument("--w-max", type=int, default=2048)
    ap.add_argument("--score-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fast-decode", default="auto", choices=["auto", "off", "static", "compiled"],
                    help="MegaContext decode step (EngineConfig.fast_decode; auto = compiled on CUDA)")
    ap.add_argument("--commit", default="", help="record this commit (a copy without git metadata)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "engine_speed"), help="OUT.{json,md}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("megacontext").setLevel(logging.WARNING)
    base = FrozenBase.load(resolve(args.base), device=args.device, dtype=args.dtype)
    ids = _text_ids(base, args)
    res = {"machine": f"{machine(base.device)}, load avg {os.getloadavg()[0]:.1f} at start",
           "command": "python " + " ".join(sys.argv),
           "commit": args.commit or git_commit(REPO),
           "settings": {"base": args.base, "w_max": args.w_max, "history_tokens": args.history_tokens,
                        "score_tokens": args.score_tokens, "new_tokens": args.new_tokens, "reps": args.reps,
                        "text": args.text or "ships_log(seed=1)", "lensnet": args.lensnet,
                        "fast_decode": args.fast_decode,
                        "torch": torch.__version__}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res["plain"], res["megacontext"] = run_all(base, ids, args, Path(d))
    res["load_avg_1m_end"] = os.getloadavg()[0]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = report(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
