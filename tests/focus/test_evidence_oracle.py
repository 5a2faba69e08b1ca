"""Evidence-oracle focus: expands exactly the evidence, pays with old raw detail, no opinion without evidence."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.registry import build_system
from megacontext.bench.tasks import TokenDoc, far_recall_samples, passkey_samples
from megacontext.core.lod import BLOCK
from megacontext.focus import FocusState
from megacontext.focus.oracles import EvidenceFocus
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig


def _covers_raw(wc, start, end):
    """True when every token of [start, end) sits in a raw (LOD0) entry."""
    s, e = wc.spans()
    raw = wc.levels == 0
    return all(bool((raw & (s <= t) & (t < e)).any()) for t in range(start, end))


@pytest.mark.parametrize("recency", ["spread", "raw_first"])
def test_oracle_brings_far_evidence_back_to_raw(recency):
    n, ev = 20_000, (3_000, 3_100)
    wc = WorkingContext(WorkingContextConfig(w_max=1024, recent_raw=128, recency=recency))
    wc.sync(n)
    assert not _covers_raw(wc, *ev)
    state = FocusState(None, n, torch.zeros(0, dtype=torch.long), "generate", {"evidence": [ev]})
    focus = EvidenceFocus()
    for _ in range(4):  # LOD2 -> LOD1 -> LOD0 takes two rounds
        wc.refocus(focus.scores(wc, state))
    assert _covers_raw(wc, *ev) and wc.cost <= 1024
    assert bool((wc.levels == 0).sum() < n // BLOCK)  # paid for with other detail, budget kept


def test_no_evidence_means_no_opinion():
    wc = WorkingContext(WorkingContextConfig(w_max=512, recent_raw=64))
    wc.sync(4_000)
    focus = EvidenceFocus()
    assert focus.scores(wc, FocusState(None, 4_000, torch.zeros(0, dtype=torch.long))) is None
    later = FocusState(None, 4_000, torch.zeros(0, dtype=torch.long), extras={"evidence": [(5_000, 5_100)]})
    assert focus.scores(wc, later) is None  # evidence not in the history yet
    with pytest.raises(ValueError, match="expand_score=0"):
        EvidenceFocus(expand_score=0)


def test_probe_samples_record_their_evidence():
    g = torch.Generator().manual_seed(0)
    docs = [TokenDoc("d", torch.randint(0, 128, (3_000,), generator=g))]
    for s in far_recall_samples(docs, [1_000], 3, passage_min=40, passage_max=60, lead=64):
        (a, b), = s.meta["evidence"]
        # the targets repeat the evidence (minus its first token, which no system can know to be a repeat)
        assert torch.equal(s.tokens[a + 1:b], s.tokens[s.target_start:s.target_end])

    def enc(text):
        return [ord(c) % 128 for c in text]

    for s in passkey_samples(docs, enc, [1_000], 2, lead=64):
        (a, b), = s.meta["evidence"]
        assert s.tokens[a:b].tolist() == enc(f" The pass key is {s.meta['key']}. Remember it. ")


def test_oracle_system_scores_within_budget(tiny_base, tmp_path):
    GistNet(GistNetConfig(layers=1, heads=2), tiny_base.d_model, tiny_base.embed_norm).save(tmp_path / "gn",
                                                                                            tiny_base)
    g = torch.Generator().manual_seed(1)
    docs = [TokenDoc("d0", torch.randint(0, 128, (2_500,), generator=g))]
    samples = far_recall_samples(docs, [1_500], 2, passage_min=40, passage_max=60, lead=64)
    for name in ("megacontext-oracle", "megacontext-oracle-rawfirst"):
        system = build_system(name, tiny_base, {"gistnet": str(tmp_path / "gn"), "chunk": 32, "recent_raw": 64})
        scores = system.score(tiny_base, samples, 320)
        assert all(torch.isfinite(sc.nll).all() for sc in scores)
        assert system.describe()["max_slots_read"]["320"] <= 320
