"""LensNet's lexical feature: off by default (old checkpoints load and score as before), on: it moves scores;
the feature itself; far-context items and their labels on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import torch

from megacontext.lensnet.far_data import FarConfig, make_items
from megacontext.lensnet.far_labels import FarLabelConfig, generate_far_labels
from megacontext.lensnet.labels import LabelSet
from megacontext.lensnet.lexfeat import LEX_FEATURES, lexical_features
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.tree import MeanPoolCompressor
from megacontext.tree.lexical import LexicalIndex


def _inputs(b=2, e=7, t=5, d=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, e, d, generator=g), torch.randint(0, 3, (b, e), generator=g),
            torch.rand(b, e, generator=g) * 5000, torch.ones(b, e, dtype=torch.bool), torch.randn(b, t, d, generator=g))


def _perturb(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def test_old_checkpoint_without_the_field_loads_and_scores_the_same(tmp_path, tiny_base):
    torch.manual_seed(0)
    net = _perturb(LensNet(LensNetConfig(), tiny_base.d_model))
    net.save(tmp_path / "ck", tiny_base)
    cfg_file = tmp_path / "ck" / "config.json"
    meta = json.loads(cfg_file.read_text())
    blob = json.dumps(meta)
    assert "lexical_features" in blob
    cfg_file.write_text(blob.replace('"lexical_features": 0, ', "").replace(', "lexical_features": 0', ""))
    assert "lexical_features" not in cfg_file.read_text()  # as written before the feature existed
    loaded, _ = LensNet.load(tmp_path / "ck", tiny_base)
    assert loaded.lex_in is None
    x = _inputs(d=tiny_base.d_model)
    lex = torch.rand(2, 7, LEX_FEATURES)
    torch.testing.assert_close(loaded(*x), net(*x))
    torch.testing.assert_close(loaded(*x, lexical=lex), net(*x))  # ignored by a net without the feature


def test_feature_moves_scores_and_is_recorded(tmp_path, tiny_base):
    torch.manual_seed(0)
    net = _perturb(LensNet(LensNetConfig(lexical_features=3), tiny_base.d_model))
    x = _inputs(d=tiny_base.d_model)
    a, b = net(*x), net(*x, lexical=torch.rand(2, 7, LEX_FEATURES) * 3)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, net(*x, lexical=torch.zeros(2, 7, LEX_FEATURES)))  # absent == no match
    net.save(tmp_path / "ck", tiny_base)
    loaded, meta = LensNet.load(tmp_path / "ck", tiny_base)
    assert meta["config"]["lexical_features"] == 3 and loaded.lex_in is not None


def test_lexical_features_mark_the_matching_entry():
    ids = np.random.default_rng(0).integers(0, 50, size=(64, 32))
    ids[10, :4] = [77, 78, 79, 80]
    idx = LexicalIndex()
    idx.add(0, ids)
    levels, indices = torch.tensor([2, 1, 0] + [0] * 29), torch.tensor([0, 32, 33] + list(range(34, 63)))
    levels[0], indices[0] = 2, 0
    feat, best = lexical_features(idx, 63, torch.tensor([77, 78, 79, 80]), levels, indices)
    assert feat.shape == (32, 3) and int(feat[:, 2].argmax()) == 0 and float(feat[0, 2]) == 1.0
    assert int(best[0]) == 10 and (best[1:] == -1).all()


def test_far_items_and_labels_roundtrip(tmp_path, tiny_base):
    vocab = tiny_base.embed_tokens.num_embeddings if hasattr(tiny_base, "embed_tokens") else 100
    g = torch.Generator().manual_seed(0)
    books = [torch.randint(5, min(vocab, 100), (3000,), generator=g) for _ in range(3)]
    meeting = {"id": 0, "ids": torch.randint(5, 90, (2600,), generator=g),
               "queries": [{"query": "why", "answer": "because", "spans": [(1500, 1600)]}]}
    encode = lambda s: [5 + (ord(c) % 80) for c in s]  # noqa: E731  (a toy tokenizer)
    fcfg = FarConfig(min_history=1024, max_history=2048, query_len=24, horizon=8)
    items = make_items(6, books, [meeting], encode, fcfg, seed=1)
    assert {it.kind for it in items} == {"repeat", "fact", "qmsum"}
    for it in items:
        assert it.t % 32 == 0 and all(b <= it.t - fcfg.query_len for _, b in it.evidence)
        shared = [it.ids(v)[: it.t - fcfg.query_len] for v in range(len(it.variants))]
        assert all(torch.equal(shared[0], s) for s in shared)
    comp = MeanPoolCompressor.from_base(tiny_base)
    cfg = FarLabelConfig(budgets=(256,), recent_raw=32, contexts_per_item=2, max_labels=6, batch_size=8,
                         shard_size=4, data=fcfg)
    stats = generate_far_labels(tiny_base, comp, items, cfg, tmp_path / "labels")
    assert stats["contexts"] == 12 and stats["evidence_labels"] > 0
    labels = LabelSet.load(tmp_path / "labels")
    batch = labels.collate([0, 1, 2])
    assert batch["lexical"].shape[-1] == LEX_FEATURES and batch["lexical"].shape[:2] == batch["levels"].shape


def test_far_gap_runs_policies_and_reports_gap(tiny_base):
    from megacontext.focus import LexicalFocus
    from megacontext.focus.far_eval import far_gap

    g = torch.Generator().manual_seed(0)
    books = [torch.randint(5, 100, (3000,), generator=g) for _ in range(3)]
    encode = lambda s: [5 + (ord(c) % 80) for c in s]  # noqa: E731
    items = make_items(2, books, [], encode, FarConfig(min_history=1024, max_history=2048, query_len=24,
                                                        horizon=8, kinds=("fact",)), seed=2)
    comp = MeanPoolCompressor.from_base(tiny_base)
    res = far_gap(tiny_base, comp, items, {"lexical": LexicalFocus()}, budgets=(256,), rounds=2, recent_raw=32)
    r = res["256"]
    assert r["items"] == 2 and set(r) >= {"recency", "lexical", "oracle"}
    assert "gap_closed" in r["lexical"] and r["oracle"]["evidence_raw"] >= r["recency"]["evidence_raw"]
