"""Read path scalability: a refocus reads only the entries it needs (never the span between far-apart
entries), through the source's gather_gists or the engine's run-based fallback; telemetry RAM is bounded."""

from __future__ import annotations

import pytest
import torch

from megacontext.core.lod import BLOCK
from megacontext.focus.lens import entry_vectors_from_source
from megacontext.runtime.engine import Engine, EngineConfig
from megacontext.runtime.focus_map import lod_map, residency, row_runs
from megacontext.runtime.telemetry import StepRecord, Telemetry, TelemetryConfig, read_jsonl
from megacontext.tree import InMemoryHistory, MeanPoolCompressor, MegaContextTree, TreeConfig
from megacontext.tree.window import GatherView
from megacontext.wc.working_context import WorkingContextConfig


class RangeOnly:
    """A history with range reads only (no gather_gists), counting what it reads."""

    def __init__(self, inner: InMemoryHistory):
        self.inner, self.num_tokens = inner, inner.num_tokens
        self.gist_rows = 0
        self.token_count = 0

    def tokens(self, start: int, end: int) -> torch.Tensor:
        self.token_count += end - start
        return self.inner.tokens(start, end)

    def gists(self, level: int, start: int, end: int) -> torch.Tensor:
        self.gist_rows += end - start
        return self.inner.gists(level, start, end)


def _history(base, n_tokens: int) -> InMemoryHistory:
    ids = torch.randint(1, 128, (n_tokens,), generator=torch.Generator().manual_seed(0))
    return InMemoryHistory(ids, MeanPoolCompressor.from_base(base), gist_dtype="float32")


def test_gather_fallback_reads_only_requested_rows(tiny_base):
    hist = _history(tiny_base, 4096 + 64)  # 130 LOD1, 4 LOD2 gists
    src = RangeOnly(hist)
    view = GatherView(src)
    idx = torch.tensor([129, 0, 129, 64, 1])
    assert torch.equal(view.gather_gists(1, idx), hist.gather_gists(1, idx))
    assert src.gist_rows == 4  # {0, 1} and {64} and {129}: not the 130 rows between 0 and 129
    assert torch.equal(view.gather_gists(2, torch.tensor([3, 0])), hist.gists(2, 0, 4)[[3, 0]])


def test_engine_uses_the_sources_gather(tiny_base, tmp_path):
    tree = MegaContextTree.create(tmp_path / "s", tiny_base.d_model, tiny_base.fingerprint,
                                  MeanPoolCompressor.from_base(tiny_base), config=TreeConfig(durable=False))
    eng = Engine(tiny_base, tree, EngineConfig(wc=WorkingContextConfig(w_max=256, recent_raw=64)))
    assert eng.view is tree  # no adapter when the source gathers itself
    eng2 = Engine(tiny_base, RangeOnly(_history(tiny_base, 64)), EngineConfig(wc=WorkingContextConfig(
        w_max=256, recent_raw=64)))
    assert isinstance(eng2.view, GatherView)
    tree.close()


def test_entry_vectors_read_cost_independent_of_spread(tiny_base):
    hist = _history(tiny_base, 2048 * BLOCK)
    levels = torch.tensor([0, 1, 2, 0, 0, 1])
    indices = torch.tensor([3, 40, 50, 1900, 1901, 2000])  # raw blocks ~60k tokens apart
    src = RangeOnly(hist)
    got = entry_vectors_from_source(tiny_base, GatherView(src), levels, indices)
    assert src.token_count == 3 * BLOCK  # the three raw blocks only, not the ~60k tokens between them
    assert src.gist_rows == 3
    blocks = torch.stack([hist.tokens(b * BLOCK, (b + 1) * BLOCK) for b in (3, 1900, 1901)])
    mean = tiny_base.embed(blocks).float().mean(1)
    want_raw = mean * (tiny_base.embed_norm / mean.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(got[levels == 0], want_raw)
    torch.testing.assert_close(got[1], hist.gists(1, 40, 41)[0].float())
    torch.testing.assert_close(got[2], hist.gists(2, 50, 51)[0].float())
    # the direct source (InMemoryHistory has gather_gists) gives the same features
    torch.testing.assert_close(entry_vectors_from_source(tiny_base, hist, levels, indices), got)


def _tiling(n_lod2: int, n_lod1: int, n_raw: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = torch.tensor([2] * n_lod2 + [1] * n_lod1 + [0] * n_raw)
    indices = torch.cat([torch.arange(n_lod2), torch.arange(n_lod1) + 32 * n_lod2,
                         torch.arange(n_raw) + 32 * n_lod2 + n_lod1])
    return levels, indices


def test_telemetry_keeps_only_recent_tilings_in_memory(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path, keep_last=50, keep_maps=4, cfg=TelemetryConfig(every=1, map_every=1))
    tilings = [_tiling(i // 10, i % 7, 3) for i in range(1, 121)]
    for i, t in enumerate(tilings):
        blocks = 32 * (i // 10) + i % 7 + 3
        tel.log(StepRecord(step=i, num_tokens=32 * blocks, phase="ingest", entries=len(t[0]), wc_cost=10, w_max=64,
                           tiling=t))
    assert len(tel.records) == 50
    assert [r.tiling is not None for r in tel.records] == [False] * 46 + [True] * 4
    assert tel.records[-1].lod_map == lod_map(*tilings[-1], tel.records[-1].num_tokens)
    # dropped tilings keep their residency, in memory and in the summary
    old = tel.records[0]
    want = residency(lod_map(*tilings[70], old.num_tokens))
    assert old.to_json()["residency"] == {k: round(v, 6) for k, v in want.items()}
    assert "frozen_residency" not in old.to_json() and "tiling" not in old.to_json()
    summary = tel.close()
    assert summary["final_residency"] == {k: round(v, 6) for k, v in tel.records[-1].residency.items()}
    steps, _ = read_jsonl(path)  # every=1, map_every=1: the file keeps every map, which viz/inspect read
    assert [lod_map_of(s) for s in steps] == [lod_map(*t, s["num_tokens"]) for t, s in zip(tilings, steps,
                                                                                          strict=True)]


def lod_map_of(row: dict) -> str:
    levels, blocks = row_runs(row)
    return "".join(str(int(lv)) * int(n) for lv, n in zip(levels, blocks, strict=True))


def test_telemetry_rejects_bad_caps():
    with pytest.raises(ValueError, match="keep_maps=10"):
        Telemetry(keep_last=5, keep_maps=10)
    with pytest.raises(ValueError, match="keep_last=0"):
        Telemetry(keep_last=0, keep_maps=0)
