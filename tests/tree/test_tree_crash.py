"""Crash safety: truncation, header damage, a fault at every write of an ingest, and real SIGKILLs.

The contract under test: reopening either recovers every committed block (tokens and gists identical to
a store that never crashed) or refuses with a TreeFormatError naming the damaged file and field; it
never returns wrong data. After a crash, resuming the append reproduces the never-crashed store byte for byte.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megacontext.tree import InMemoryHistory, MegaContextTree, TreeFormatError
from megacontext.tree.format import HEADER_SIZE, field_at
from megacontext.tree.layout import LEVEL_FILES, META
from megacontext.tree.store import TreeConfig
from tests.tree.tree_helpers import FP, make_compressor, new_tree, stream

N_TOKENS = 2 * 1024 + 3 * 32 + 7  # two LOD2 groups, three more blocks, a 7-token tail


def build(root: Path, ids: torch.Tensor) -> None:
    with new_tree(root, batch_blocks=32) as t:
        t.append(ids)


def assert_recovered(t: MegaContextTree, ids: torch.Tensor, ref: InMemoryHistory, min_blocks: int = 0) -> None:
    """Whatever was recovered is a correct prefix of ids, with exactly the reference gists."""
    n = t.num_tokens
    assert t.num_committed_blocks >= min_blocks
    assert torch.equal(t.tokens(0, n), ids[:n])
    for level in (1, 2):
        k = t.num_entries(level)
        assert torch.equal(t.gists(level, 0, k), ref.gists(level, 0, k))


def test_truncation_recovers_or_refuses(tmp_path):
    ids = stream(N_TOKENS)
    ref = InMemoryHistory(ids, make_compressor())
    build(tmp_path / "clean", ids)
    for name in LEVEL_FILES:  # staged rows of an interrupted commit after the committed ones
        with open(tmp_path / "clean" / name, "ab") as fh:
            fh.write(os.urandom(1000))
    rng = random.Random(0)
    outcomes = {"recovered": 0, "refused": 0}
    for trial in range(80):
        root = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "clean", root)
        name = rng.choice(LEVEL_FILES)
        path = root / name
        size = path.stat().st_size
        committed_end = size - 1000
        cut = rng.choice([rng.randrange(0, HEADER_SIZE), rng.randrange(HEADER_SIZE, committed_end),
                          rng.randrange(committed_end, size + 1)])
        os.truncate(path, cut)
        try:
            t = MegaContextTree.open(root, make_compressor(), FP)
        except TreeFormatError as e:
            assert cut < committed_end, f"refused a store whose committed rows were intact: {e}"
            assert e.path == str(path) and e.field == ("file_size" if cut < HEADER_SIZE else "entry_count")
            outcomes["refused"] += 1
            if name != "LOD0.ctx" and cut >= HEADER_SIZE:  # gists are derived: a rebuild restores them
                with MegaContextTree.open(root, make_compressor(), FP, rebuild=True) as t:
                    assert_recovered(t, ids, ref, min_blocks=N_TOKENS // 32)
            continue
        assert cut >= committed_end
        assert t.num_tokens == N_TOKENS
        assert_recovered(t, ids, ref)
        t.close()
        outcomes["recovered"] += 1
    assert outcomes["recovered"] > 10 and outcomes["refused"] > 10


def test_header_and_meta_damage_refused(tmp_path):
    ids = stream(N_TOKENS)
    build(tmp_path / "clean", ids)
    rng = random.Random(1)
    for trial in range(150):
        root = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "clean", root)
        name = rng.choice([*LEVEL_FILES, META])
        path = root / name
        raw = bytearray(path.read_bytes())
        span = HEADER_SIZE if name != META else len(raw)
        offsets = sorted(rng.sample(range(span), rng.randint(1, 3)))
        for off in offsets:
            raw[off] ^= rng.randint(1, 255)
        path.write_bytes(bytes(raw))
        with pytest.raises(TreeFormatError) as e:
            MegaContextTree.open(root, readonly=True)
        assert e.value.path == str(path)
        if name != META:
            fields = [field_at(o) for o in offsets]
            expected = next((f for f in ("magic", "format_version") if f in fields), "header_checksum")
            assert e.value.field == expected


class Crash(Exception):
    pass


class FaultInjector:
    """Replaces os.pwrite / os.replace; the k-th call fails like a kill: row writes may land half-written,
    a header write (one sector at offset 0) lands whole or not at all, a rename happens or not."""

    def __init__(self, fail_at: int | None, rng: random.Random):
        self.fail_at, self.rng, self.calls = fail_at, rng, 0
        self.pwrite, self.replace = os.pwrite, os.replace

    def _tick(self) -> bool:
        self.calls += 1
        return self.fail_at is not None and self.calls == self.fail_at

    def fake_pwrite(self, fd, data, offset):
        if self._tick():
            if offset != 0:
                self.pwrite(fd, bytes(memoryview(data)[: self.rng.randrange(len(data) + 1)]), offset)
            raise Crash
        return self.pwrite(fd, data, offset)

    def fake_replace(self, src, dst):
        if self._tick():
            raise Crash
        return self.replace(src, dst)


def ingest(root: Path, ids: torch.Tensor, rng: random.Random, held: list) -> MegaContextTree:
    t = new_tree(root, batch_blocks=32)
    held.append(t)
    pos = 0
    while pos < ids.numel():
        step = rng.randint(1, 700)
        t.append(ids[pos:pos + step])
        pos += step
        if rng.random() < 0.3:
            t.flush()
    return t


def test_fault_at_every_write_recovers_and_resumes(tmp_path, monkeypatch):
    ids = stream(N_TOKENS)
    ref_hist = InMemoryHistory(ids, make_compressor())
    counter = FaultInjector(None, random.Random(0))
    monkeypatch.setattr(os, "pwrite", counter.fake_pwrite)
    monkeypatch.setattr(os, "replace", counter.fake_replace)
    ingest(tmp_path / "ref", ids, random.Random(7), []).close()
    total = counter.calls
    assert total > 20
    reference = {n: (tmp_path / "ref" / n).read_bytes() for n in (*LEVEL_FILES, META)}
    for k in range(1, total + 1):
        inj = FaultInjector(k, random.Random(k))
        monkeypatch.setattr(os, "pwrite", inj.fake_pwrite)
        monkeypatch.setattr(os, "replace", inj.fake_replace)
        root = tmp_path / f"k{k}"
        held: list[MegaContextTree] = []
        with pytest.raises(Crash):
            ingest(root, ids, random.Random(7), held).close()
        for crashed in held:
            crashed.abort()  # what the kernel does to a killed process's descriptors
        monkeypatch.setattr(os, "pwrite", inj.pwrite)
        monkeypatch.setattr(os, "replace", inj.replace)
        if not (root / META).exists():  # killed inside create(): nothing was ever committed
            continue
        with MegaContextTree.open(root, readonly=True) as r:  # a reader repairs nothing, yet reads right
            assert_recovered(r, ids, ref_hist)
        t = MegaContextTree.open(root, make_compressor(), FP, config=TreeConfig(batch_blocks=32, durable=False))
        assert_recovered(t, ids, ref_hist)
        t.append(ids[t.num_tokens:])
        t.close()
        for name, data in reference.items():
            assert (root / name).read_bytes() == data, f"fault at write {k}: {name} differs after resume"
        shutil.rmtree(root)


_CHILD = """
import random, sys, torch
from tests.tree.tree_helpers import new_tree, stream
ids = stream(int(sys.argv[2]))
t = new_tree(sys.argv[1], batch_blocks=32, durable=True)
print("ready", flush=True)
rng, pos = random.Random(int(sys.argv[3])), 0
while pos < ids.numel():
    step = rng.randint(1, 3000)
    t.append(ids[pos:pos + step]); pos += step
    if rng.random() < 0.2:
        t.flush()
"""


def kill_trials(tmp_path, trials: int) -> None:
    n = 400_000
    ids = stream(n)
    ref = InMemoryHistory(ids, make_compressor())
    repo = Path(__file__).resolve().parents[2]
    for trial in range(trials):
        root = tmp_path / f"kill{trial}"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(n), str(trial)], cwd=repo,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.Random(trial).uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with MegaContextTree.open(root, make_compressor(), FP) as t:
            assert_recovered(t, ids, ref)


def test_sigkill_during_append(tmp_path):
    kill_trials(tmp_path, trials=1)


@pytest.mark.slow
def test_sigkill_during_append_many(tmp_path):
    kill_trials(tmp_path, trials=20)
