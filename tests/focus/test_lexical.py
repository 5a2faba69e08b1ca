"""Lexical focus: rare n-gram matching and, through the engine, expanding the gist that holds a fact."""

from __future__ import annotations

import pytest
import torch

from megacontext.focus import FocusState, LexicalFocus, LexicalFocusConfig, make_policy
from megacontext.focus.lexical import match_weights, ngram_ids
from megacontext.wc import check_invariants
from tests.conftest import tree_engine

_engine = tree_engine


def test_registry_builds_the_name_only_policies():
    assert make_policy("recency").name == "recency" and make_policy("lexical").name == "lexical"
    assert make_policy("lexical").query_tokens == LexicalFocusConfig().query_tokens
    with pytest.raises(ValueError, match="lensnet needs a checkpoint"):
        make_policy("lensnet")


def test_ngram_matching_prefers_rare_ngrams():
    hist = torch.tensor([1, 2, 3, 4, 9, 9, 1, 2, 3, 4, 9, 5, 6, 7, 8, 9])
    assert ngram_ids(hist, 4).shape == (13,)
    w = match_weights(hist, torch.tensor([5, 6, 7, 8]), n=4, max_occurrences=2)
    assert w[11:15].sum() == pytest.approx(1.0) and w[:11].sum() == 0
    w2 = match_weights(hist, torch.tensor([1, 2, 3, 4]), n=4, max_occurrences=1)
    assert w2.sum() == 0  # seen twice: boilerplate at max_occurrences=1


def test_lexical_focus_expands_the_matching_gist(tiny_base, tmp_path):
    torch.manual_seed(4)
    eng = _engine(tiny_base, tmp_path, w_max=200, recent_raw=64, focus="recency")
    fact = torch.tensor([101, 7, 55, 13, 99, 42, 8, 77, 3, 64, 21, 90, 11, 33, 120, 5])
    hist = torch.cat([torch.randint(1, 100, (40,)), fact, torch.randint(1, 100, (3000,))])
    eng.ingest(hist)
    fact_block = 40 // 32
    cover = eng.wc.spans()
    holder = int(((cover[0] <= 40) & (cover[1] > 40)).nonzero()[0])
    assert int(eng.wc.levels[holder]) > 0  # recency alone has compressed it
    eng.policy = LexicalFocus(LexicalFocusConfig(ngram=4))
    scores = eng.policy.scores(eng.wc, FocusState(eng.view, eng.num_tokens, fact[:12], "generate"))
    assert int(scores.argmax()) == holder
    eng.focus_on(fact[:12], rounds=2)
    starts, _ = eng.wc.spans()
    raw_blocks = eng.wc.indices[eng.wc.levels == 0]
    assert fact_block in raw_blocks.tolist()
    check_invariants(eng.wc)
    assert starts.numel() == len(eng.wc)
