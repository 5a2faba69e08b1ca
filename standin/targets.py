"""The targets of issue 15 and their check against an evaluation report (standin.evaluate's JSON).

usage: python -m standin.targets docs/results/standin_base.json   (prints the target table; exit 0)

A target is met when its point estimate is on the right side of the bound; the 95% interval is shown
beside it so that a "met" that rests on noise is visible. Targets relative to v1 are "missed" (not
"met") when the report has no v1 measurement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _get(report: dict, *keys):
    cur = report
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def check(report: dict) -> list[dict]:
    """One row per target: name, bound (text), value, interval, met (bool)."""
    rows = []

    def add(name, bound, value, ok, interval=None):
        rows.append({"target": name, "bound": bound, "value": value, "interval": interval,
                     "met": bool(ok) if value is not None else False})

    m2 = _get(report, "models", "v2") or {}
    for d in ("1984", "1024"):
        v = _get(report, "copy_nll", d)
        add(f"copy probe NLL at D={d} (nats/token)", "<= 1.0", v, v is not None and v <= 1.0,
            _interval(_get(m2, "copy_nll", d)))
    v = report.get("passkey_top1_in_view")
    add("passkey greedy top-1, in view", ">= 0.9", v, v is not None and v >= 0.9,
        _interval(_get(m2, "passkey_top1_in_view")))
    v = report.get("fact_exact_in_view")
    add("planted facts exact, held-out phrasings, in view", ">= 0.8", v, v is not None and v >= 0.8,
        _interval(_get(m2, "fact_exact_in_view")))
    v, v1 = report.get("val_nll"), report.get("val_nll_v1")
    diff = report.get("val_nll_diff")
    add("dev-book NLL vs v1 (v2 - v1)", "<= +0.03", None if v1 is None else round(v - v1, 4),
        v1 is not None and v - v1 <= 0.03, _interval(diff))
    far = max(report.get("skip_nll", {}) or {"0": None}, key=int)
    s2, s1 = _get(report, "skip_nll", far), _get(report, "skip_nll_v1", far)
    add(f"second-half NLL after a {int(far):,}-position skip vs v1 (v2 - v1)", "<= +0.05",
        None if s1 is None or s2 is None else round(s2 - s1, 4), s1 is not None and s2 - s1 <= 0.05,
        _interval(report.get("skip_far_diff")))
    return rows


def _interval(e) -> list[float] | None:
    return [e["lo"], e["hi"]] if isinstance(e, dict) and "lo" in e else None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(report: dict) -> str:
    rows = report.get("targets") or check(report)
    lines = ["| target | bound | value | 95% interval | status |", "|---|---|---|---|---|"]
    for r in rows:
        iv = "" if r["interval"] is None else f"[{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]"
        lines.append(f"| {r['target']} | {r['bound']} | {_fmt(r['value'])} | {iv} | "
                     f"{'met' if r['met'] else '**missed**'} |")
    return "\n".join(lines)


def _est(e) -> str:
    if not isinstance(e, dict):
        return "n/a"
    s = f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"
    return s + (f" (n={e['n']})" if "n" in e else "")


def markdown(report: dict) -> str:
    """The results page: provenance, targets, then every probe for each model side by side."""
    run = report.get("run", {})
    models = report.get("models", {})
    names = list(models)
    out = [
        "# Stand-in base v2 against v1 (issue 15)", "",
        f"Command: `{run.get('command', '?')}`  ",
        f"Commit: `{run.get('commit', '?')}`; machine: {run.get('machine', '?')}; date: {run.get('date', '?')}; "
        f"torch {run.get('torch', '?')}.  ",
        f"Model: `{report.get('model_dir')}` (sha256 of its model.safetensors `{report.get('model_sha256')}`); "
        f"v1: `{report.get('v1_dir')}`.  ",
        f"Dev books ({len(report.get('dev_books', []))}, {report.get('dev_tokens', 0):,} tokens): "
        + ", ".join(report.get("dev_books", [])) + ".", "",
        "Definitions: standin/evaluate.py (module docstring). Intervals: 95%, cluster bootstrap over books for "
        "NLLs, Wilson for rates; n = windows or trials.", "",
        "## Targets", "", table(report), "",
        "## Probes", "",
        "| probe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
    ]
    keys = [("val_nll", "dev-book NLL")]
    for d in next(iter(models.values()), {}).get("copy_nll", {}):
        keys += [(("copy_nll", d), f"copy NLL, D={d}"),
                 (("copy_nll_nocopy", d), f"same tokens without the copy, D={d}")]
    keys += [("passkey_top1_in_view", "passkey top-1 (all gaps)")]
    for g in next(iter(models.values()), {}).get("passkey_by_gap", {}):
        keys.append((("passkey_by_gap", g), f"passkey top-1, gap {g}"))
    keys += [("fact_exact_in_view", "facts exact (held-out phrasings)")]
    for k in next(iter(models.values()), {}).get("fact_by_count", {}):
        keys.append((("fact_by_count", k), f"facts exact, {k} fact(s) in the row"))
    for s in next(iter(models.values()), {}).get("skip_nll", {}):
        keys.append((("skip_nll", s), f"second-half NLL, skip {int(s):,}"))
    for key, label in keys:
        cells = [_est(_get(models[n], *key) if isinstance(key, tuple) else models[n].get(key)) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", f"Evaluation time: {report.get('seconds')} s for {len(names)} model(s).", ""]
    return "\n".join(out)


def card_fields(report: dict, state: dict | None = None) -> dict[str, str]:
    """Values for the {{field}}s of standin/MODEL_CARD.md, from a report and the run's state.json."""
    state = state or {}
    m2, m1 = _get(report, "models", "v2") or {}, _get(report, "models", "v1") or {}
    far = str(max((int(k) for k in report.get("skip_nll", {"0": 0})), default=0))

    def val(m, *keys):
        e = _get(m, *keys)
        return _fmt(e.get("value")) if isinstance(e, dict) else "n/a"

    cfg = state.get("config", {})
    steps = state.get("step")
    unique, passes = state.get("unique_tokens", {}), state.get("passes", {})
    n_tok = steps * cfg.get("batch", 64) * cfg.get("seq", 2048) if isinstance(steps, int) else None
    f = {
        "model_sha256": report.get("model_sha256") or state.get("model_sha256") or "n/a",
        "steps": f"{steps:,}" if isinstance(steps, int) else "n/a",
        "tokens_m": f"{n_tok / 1e6:.0f}" if n_tok else "n/a",
        "minutes": f"{cfg['minutes']:g}" if "minutes" in cfg else "n/a",
        "lr": f"{cfg['lr']:g}" if "lr" in cfg else "n/a",
        "books_tokens_m": f"{unique.get('books', 0) / 1e6:.1f}", "code_tokens_m": f"{unique.get('code', 0) / 1e6:.1f}",
        "book_passes": _fmt(passes.get("books")), "code_passes": _fmt(passes.get("code")),
        "book_ce_weight": _fmt(state.get("book_ce_weight")),
        "val_nll": val(m2, "val_nll"), "val_nll_v1": val(m1, "val_nll"),
        "passkey": val(m2, "passkey_top1_in_view"), "passkey_v1": val(m1, "passkey_top1_in_view"),
        "facts": val(m2, "fact_exact_in_view"), "facts_v1": val(m1, "fact_exact_in_view"),
        "skip_far": val(m2, "skip_nll", far), "skip_far_v1": val(m1, "skip_nll", far),
        "commit": _get(report, "run", "commit") or "n/a", "machine": _get(report, "run", "machine") or "n/a",
    }
    for d in ("256", "1024", "1984"):
        f[f"copy_{d}"], f[f"copy_{d}_v1"] = val(m2, "copy_nll", d), val(m1, "copy_nll", d)
        f[f"nocopy_{d}"], f[f"nocopy_{d}_v1"] = val(m2, "copy_nll_nocopy", d), val(m1, "copy_nll_nocopy", d)
    return f


def render_card(template: str, fields: dict[str, str]) -> str:
    for k, v in fields.items():
        template = template.replace("{{" + k + "}}", v)
    return template


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m standin.targets", description="print issue 15's target table")
    p.add_argument("report")
    p.add_argument("--card", help="model card template to fill (printed instead of the table)")
    p.add_argument("--state", help="the run's state.json (training facts for the card)")
    a = p.parse_args(argv)
    if not Path(a.report).is_file():
        print(f"error: no report at {a.report!r}", file=sys.stderr)
        return 2
    report = json.loads(Path(a.report).read_text())
    if a.card:
        state = json.loads(Path(a.state).read_text()) if a.state else {}
        print(render_card(Path(a.card).read_text(), card_fields(report, state)), end="")
        return 0
    print(table({**report, "targets": check(report)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
