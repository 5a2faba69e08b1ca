"""Issue 14 at the API: unbounded depth, refused calls that change nothing, durable acknowledged writes,
recovery reports and atomic store creation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megacontext.api import ENGINE_FILE, MegaContext, StoreError
from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.sampling import SamplingConfig
from megacontext.tree import StoreBusyError, TreeConfig
from megacontext.wc import BudgetError
from megacontext.wc.working_context import WorkingContextConfig, check_invariants

CFG = EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64))
# LOD0-2 alone reach 65,536 tokens at this budget; with LOD3 the reach is ~2.1M tokens
DEEP = EngineConfig(wc=WorkingContextConfig(w_max=156, recent_raw=32))


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _crash(mc: MegaContext) -> None:
    """What a SIGKILL leaves behind: descriptors closed (so the lock is free), nothing flushed or saved."""
    mc.tree.abort()
    mc._closed = True


def test_history_far_past_the_two_level_reach_stays_usable(tiny_base, tmp_path):
    store, ids = tmp_path / "deep", _ids(100_000)
    with MegaContext.create(store, tiny_base, config=DEEP, durable=False) as mc:
        mc.ingest(ids)
        assert int(mc.engine.wc.levels.max()) == 3  # LOD3 appeared once LOD0-2 could no longer fit
        check_invariants(mc.engine.wc)
    with MegaContext.open(store, tiny_base, readonly=True) as mc:
        assert mc.num_tokens == ids.numel() and torch.equal(mc.tree.tokens(0, ids.numel()), ids)
    with MegaContext.open(store, tiny_base) as mc:
        assert len(list(mc.generate_ids(ids[:8], SamplingConfig(max_new_tokens=8)))) == 8
        assert torch.isfinite(mc.score(ids[:64]).nll).all()
        check_invariants(mc.engine.wc)


def test_ingest_past_the_reach_is_refused_before_anything_is_written(tiny_base, tmp_path):
    store, ids = tmp_path / "small", _ids(5000)
    # the floor budget: a history of 2,079 tokens (63 older blocks = 1 LOD2 + 31 LOD1 gists, 32 protected
    # tokens and a 31-token tail) needs 95 slots; 2,080 tokens need 64 again
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=94, recent_raw=32))
    with MegaContext.create(store, tiny_base, config=cfg, durable=False) as mc:
        mc.ingest(ids[:1000])
        with pytest.raises(BudgetError, match="2,079 tokens.*nothing was written"):
            mc.ingest(ids[1000:2079])
        assert mc.num_tokens == 1000
    with MegaContext.open(store, tiny_base) as mc:  # the store is not bricked
        assert mc.num_tokens == 1000 and torch.equal(mc.tree.tokens(0, 1000), ids[:1000])
        mc.ingest(ids[1000:2080])  # every length this call syncs to fits
        assert len(list(mc.generate_ids(ids[:4], SamplingConfig(max_new_tokens=4)))) == 4


def test_bad_inputs_are_refused_and_lose_nothing(tiny_base, tmp_path):
    store, ids = tmp_path / "mem", _ids(300)
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        mc.ingest(ids[:100])
        with pytest.raises(ValueError, match=r"20000.*vocabulary of 128"):
            mc.ingest([20000] * 5)
        with pytest.raises(ValueError, match="-1"):
            mc.ingest([3, -1])
        with pytest.raises(TypeError, match="integer"):
            mc.ingest(torch.tensor([1.5, 2.0]))
        with pytest.raises(ValueError, match="vocabulary"):
            mc.score([5, 128])
        with pytest.raises(ValueError, match="vocabulary"):
            list(mc.generate_ids([999]))
        mc.ingest(ids[100:])
        assert mc.num_tokens == 300
    with MegaContext.open(store, tiny_base) as mc:
        assert torch.equal(mc.tree.tokens(0, 300), ids)


def test_a_failing_close_releases_the_lock(tiny_base, tmp_path, monkeypatch):
    store = tmp_path / "mem"
    mc = MegaContext.create(store, tiny_base, config=CFG, durable=False)
    mc.ingest(_ids(100))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mc.tree, "flush", disk_full)
    with pytest.raises(OSError, match="No space"):
        mc.close()
    monkeypatch.undo()
    with MegaContext.open(store, tiny_base) as again:  # not "open for writing by another process"
        assert again.num_tokens == 100  # ingest() had made them durable before the failing close


def test_store_path_must_be_a_directory(tiny_base, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        MegaContext.create(f, tiny_base)
    with pytest.raises(StoreError, match="not a directory"):
        MegaContext.open(f, tiny_base)


def test_ingest_is_durable_when_it_returns(tiny_base, tmp_path):
    store, ids = tmp_path / "mem", _ids(5000)
    mc = MegaContext.create(store, tiny_base, config=CFG)
    mc.ingest(ids[:3000])
    mc.ingest(ids[3000:])
    _crash(mc)
    with MegaContext.open(store, tiny_base) as mc:
        assert mc.num_tokens == 5000 and torch.equal(mc.tree.tokens(0, 5000), ids)
        rec = mc.recovered
        assert rec is not None and rec.acknowledged == 5000 and rec.num_tokens == 5000 and rec.lost == 0
    with MegaContext.open(store, tiny_base) as mc:
        assert mc.recovered is None  # closed cleanly last time


def test_a_long_ingest_commits_at_the_interval(tiny_base, tmp_path, monkeypatch):
    store, ids = tmp_path / "mem", _ids(20_000)
    mc = MegaContext.create(store, tiny_base, config=CFG, tree=TreeConfig(commit_tokens=1024, durable=False))
    mc.ingest(ids[:500])  # acknowledged
    appended = [0]
    real_append = mc.tree.append

    class Killed(Exception):
        pass

    def append(tokens):
        appended[0] += len(tokens)
        if appended[0] > 15_000:
            raise Killed
        real_append(tokens)

    monkeypatch.setattr(mc.tree, "append", append)
    with pytest.raises(Killed):
        mc.ingest(ids[500:])
    _crash(mc)
    with MegaContext.open(store, tiny_base) as mc:
        n = mc.num_tokens
        assert 15_000 - 1024 - 32 <= n <= 15_000 and torch.equal(mc.tree.tokens(0, n), ids[:n])
        assert mc.recovered.acknowledged == 500 and mc.recovered.num_tokens == n
        check_invariants(mc.engine.wc)


_CHILD = """
import sys, torch
from megacontext.api import MegaContext
from megacontext.base import FrozenBase
from megacontext.runtime.engine import EngineConfig
from megacontext.tree import TreeConfig
from megacontext.wc import WorkingContextConfig
from tests.conftest import tiny_llama
ids = torch.randint(0, 128, (400_000,), generator=torch.Generator().manual_seed(1))
cfg = EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64))
mc = MegaContext.create(sys.argv[1], FrozenBase(tiny_llama(), name="t"), config=cfg,
                        tree=TreeConfig(commit_tokens=2048))
pos = 0
for n in (700, 1300, 2500):
    mc.ingest(ids[pos:pos + n]); pos += n
    print("ack", pos, flush=True)
mc.ingest(ids[pos:].repeat(25))  # killed in here (~10M tokens: bulk ingest takes 400k in well under 0.5 s)
"""


def test_sigkill_mid_ingest_keeps_what_was_acknowledged(tmp_path, tiny_base):
    store = tmp_path / "mem"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(store)], cwd=repo, stdout=subprocess.PIPE, text=True)
    acked = 0
    for _ in range(3):
        acked = int(proc.stdout.readline().split()[1])
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ids = torch.randint(0, 128, (400_000,), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([ids[:4500], ids[4500:].repeat(25)])  # what the child streamed
    with MegaContext.open(store, tiny_base) as mc:
        n = mc.num_tokens
        assert n >= acked == 4500 and n < ids.numel() and torch.equal(mc.tree.tokens(0, n), ids[:n])
        assert mc.recovered is not None and mc.recovered.acknowledged == acked and mc.recovered.lost == 0
        check_invariants(mc.engine.wc)


def test_create_is_atomic(tiny_base, tmp_path, monkeypatch):
    import megacontext.runtime.persist as persist

    store = tmp_path / "mem"

    def boom(*a, **k):
        raise OSError(5, "I/O error while writing the engine state")

    monkeypatch.setattr(persist, "save_file", boom)  # the working-context state, written after the tree
    with pytest.raises(OSError, match="I/O error"):
        MegaContext.create(store, tiny_base, config=CFG)
    monkeypatch.undo()
    assert not store.exists() and not list(tmp_path.iterdir())  # no half-made store, no temp left behind
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        mc.ingest(_ids(100))
    assert (store / ENGINE_FILE).is_file()


def test_second_writer_is_refused(tiny_base, tmp_path):
    store = tmp_path / "mem"
    with MegaContext.create(store, tiny_base, config=CFG, durable=False):
        with pytest.raises(StoreBusyError, match="open for writing"):
            MegaContext.open(store, tiny_base)
        with MegaContext.open(store, tiny_base, readonly=True) as r:
            assert r.num_tokens == 0


def test_a_store_written_before_issue_14_opens(tiny_base, tmp_path, caplog):
    """Format-1 level files (LOD0-2, no checksums), meta.json v1 and an engine.json without the new fields."""
    from tests.tree.legacy import downgrade_to_v1

    store, ids = tmp_path / "mem", _ids(40_000)
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        mc.ingest(ids)
    meta = json.loads((store / ENGINE_FILE).read_text())
    for key in ("checksum", "writer_open", "num_tokens"):
        meta.pop(key, None)
    meta["config"].pop("telemetry", None)
    (store / ENGINE_FILE).write_text(json.dumps(meta))
    downgrade_to_v1(store)
    with caplog.at_level("WARNING"), MegaContext.open(store, tiny_base) as mc:
        assert mc.num_tokens == 40_000 and torch.equal(mc.tree.tokens(0, 40_000), ids)
        assert mc.tree.num_levels == 4  # LOD3 added on this first writable open
        assert len(list(mc.generate_ids(ids[:4], SamplingConfig(max_new_tokens=4)))) == 4
    assert "no checksums" in caplog.text
    assert os.path.getsize(store / ENGINE_FILE) > 0
