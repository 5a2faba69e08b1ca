"""Summaries, targets and markdown of the gist evaluation, on synthetic per-window scores."""

from __future__ import annotations

import numpy as np
import pytest

from megacontext.core.provenance import command_line, git_commit, machine, run_info
from megacontext.gistnet.eval.report import summarise, targets, to_markdown


def synthetic(gist_gap: float, n: int = 400, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = rng.normal(3.0, 0.4, n)
    drop = raw + 0.2 + rng.normal(0, 0.01, n)
    gist = drop - gist_gap * 0.2
    cols = {"raw": raw, "drop": drop, "gist": gist, "meanpool": drop - 0.01}
    return {"horizon": {"lod1-896of1024": cols},
            "copy": {"lod1-896of1024": {k: v + 1 for k, v in cols.items()}},
            "cram": {"lod1-896of1024": {**cols, "cram": raw + 0.01, "init_kl": np.full(n, 0.3),
                                        "cram_kl": np.full(n, 0.05)}}}


def test_summary_metrics_and_targets():
    summary = summarise({"books": synthetic(0.9), "code": synthetic(0.3)}, n_boot=200)
    books = summary["books"]["horizon"]["lod1-896of1024"]
    assert books["n"] == 400
    assert list(books["variants"]) == ["raw", "gist", "meanpool", "drop"]
    assert "dnll" not in books["variants"]["raw"] and "gap_recovered" not in books["variants"]["drop"]
    gap = books["variants"]["gist"]["gap_recovered"]
    assert gap["value"] == pytest.approx(0.9, abs=0.05) and gap["lo"] <= gap["value"] <= gap["hi"]
    assert books["variants"]["gist"]["dnll"]["value"] == pytest.approx(0.02, abs=0.005)
    cram = summary["books"]["cram"]["lod1-896of1024"]
    assert cram["cram_kl"]["value"] == pytest.approx(0.05) and "gist_vs_cram" in cram
    met = {t["target"]: t["met"] for t in targets(summary)}
    assert met == {"LOD1 gap recovered >= 0.4 (books, lod1-896of1024)": True,
                   "copy probe gap recovered >= 0.3 (books, lod1-896of1024)": True}
    assert {t["verdict"] for t in targets(summary)} == {"met"}
    missed = targets(summarise({"books": synthetic(0.1)}, n_boot=50))
    assert not any(t["met"] for t in missed) and {t["verdict"] for t in missed} == {"missed"}
    assert targets(summarise({"code": synthetic(0.9)}, n_boot=50)) == []  # no books domain, nothing to check


def test_document_groups_widen_intervals_and_map_through_window_index():
    scores = synthetic(0.9, n=200)
    docs = np.repeat(np.arange(4), 50)  # four documents of 50 windows each
    by_window = summarise({"books": scores}, n_boot=200)["books"]["horizon"]["lod1-896of1024"]
    by_doc = summarise({"books": scores}, n_boot=200, groups_by_domain={"books": docs})["books"]
    res = by_doc["horizon"]["lod1-896of1024"]
    assert res["groups"] == 4 and by_window["groups"] is None
    assert by_window["variants"]["raw"]["nll"]["value"] == pytest.approx(res["variants"]["raw"]["nll"]["value"])
    # the cram rows are a subset of the windows: groups follow them through window_index
    rows = np.arange(0, 200, 25)  # two windows per document
    scores["cram"]["lod1-896of1024"] = {k: v[rows] for k, v in scores["cram"]["lod1-896of1024"].items()}
    scores["cram"]["lod1-896of1024"]["window_index"] = rows
    cram = summarise({"books": scores}, n_boot=50, groups_by_domain={"books": docs})["books"]["cram"]
    assert cram["lod1-896of1024"]["groups"] == 4


def test_markdown_names_provenance_and_every_table():
    summary = summarise({"books": synthetic(0.9)}, n_boot=50)
    report = {"run": run_info(argv=["megacontext", "eval", "gist", "--windows", "3"]), "seconds": 1.5,
              "base": "b", "gistnet": "g", "windows": {"books": 400},
              "config": {"context": 1024, "horizon": 64, "n_boot": 50},
              "targets": targets(summary), "summary": summary}
    md = to_markdown(report)
    assert "`megacontext eval gist --windows 3`" in md
    assert f"commit: `{report['run']['commit']}`" in md and report["run"]["machine"] in md
    assert md.count("| variant | NLL |") == 3
    assert "## Targets" in md and "| gist |" in md


def test_provenance_fields():
    assert git_commit() != ""  # a short hash (possibly +dirty) inside the repo, "unknown" elsewhere
    assert machine().startswith("CPU")
    assert command_line(["/usr/bin/megacontext", "eval", "a b"]) == "megacontext eval 'a b'"
