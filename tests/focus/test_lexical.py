"""Lexical focus: BM25 on the history's index and, through the engine, expanding the gist that holds a fact."""

from __future__ import annotations

import pytest
import torch

from megacontext.focus import FocusState, LexicalFocus, LexicalFocusConfig, make_policy
from megacontext.wc import AllocatorConfig, WorkingContext, WorkingContextConfig, check_invariants
from tests.conftest import tree_engine

_engine = tree_engine


def test_registry_builds_the_name_only_policies():
    assert make_policy("recency").name == "recency" and make_policy("lexical").name == "lexical"
    assert make_policy("lexical").query_tokens == LexicalFocusConfig().query_tokens
    with pytest.raises(ValueError, match="lensnet needs a checkpoint"):
        make_policy("lensnet")


class _Hist:
    """A token history seen as a source (tokens + num_tokens), as policies read it."""

    def __init__(self, ids):
        self.ids, self.num_tokens = ids, ids.numel()

    def tokens(self, a, b):
        return self.ids[a:b]


def test_bm25_policy_targets_the_rare_match_and_goes_raw_in_one_step():
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 500, (40_000,), generator=g)
    hist[5000:5004] = torch.tensor([900, 901, 902, 903])  # rare tokens in block 156, under an LOD2 gist
    query = torch.tensor([1, 900, 901, 902, 903, 2])
    hist = torch.cat([hist, query])[: 40_000]
    src = _Hist(hist)
    wc = WorkingContext.assemble(src.num_tokens, WorkingContextConfig(w_max=1024, recent_raw=64))
    pol = LexicalFocus()
    scores = pol.scores(wc, FocusState(src, src.num_tokens, query, "generate"))
    holder = int(((wc.spans()[0] <= 5000) & (wc.spans()[1] > 5000)).nonzero()[0])
    assert int(wc.levels[holder]) == 2 and int(scores.argmax()) == holder
    assert int(pol.last_targets[holder]) == 5000 // 32
    wc.refocus(scores, AllocatorConfig(), targets=pol.last_targets)
    check_invariants(wc)
    assert 5000 // 32 in wc.indices[wc.levels == 0].tolist()  # LOD2 -> raw in one refocus
    assert pol.scores(wc, FocusState(src, src.num_tokens, query, "score")) is None  # prompts only by default


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
    eng.policy = LexicalFocus(LexicalFocusConfig(min_score=2.0))
    scores = eng.policy.scores(eng.wc, FocusState(eng.view, eng.num_tokens, fact[:12], "generate"))
    assert int(scores.argmax()) == holder
    eng.focus_on(fact[:12], rounds=2)
    starts, _ = eng.wc.spans()
    raw_blocks = eng.wc.indices[eng.wc.levels == 0]
    assert fact_block in raw_blocks.tolist()
    check_invariants(eng.wc)
    assert starts.numel() == len(eng.wc)


def test_store_index_and_private_index_agree(tmp_path):
    """The engine's source is the store: the policy then uses the store's persistent index (pending blocks
    included) and must score exactly as with an index it builds itself."""
    from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (20_000,), generator=g)
    ids[3000:3004] = torch.tensor([400, 401, 402, 403])
    query = torch.tensor([5, 400, 401, 402, 403, 7])
    ids[-6:] = query
    tree = MegaContextTree.create(tmp_path / "s", 8, "fp", MeanPoolCompressor(torch.randn(512, 8)), vocab_size=512,
                                  config=TreeConfig(batch_blocks=64, commit_seconds=1e9))
    tree.append(ids[:10_000])
    tree.flush()
    tree.append(ids[10_000:])  # partly pending: the index must see them through the store
    wc = WorkingContext.assemble(ids.numel(), WorkingContextConfig(w_max=1024, recent_raw=64))
    a, b = LexicalFocus(), LexicalFocus()
    sa = a.scores(wc, FocusState(tree, tree.num_tokens, query, "generate"))
    sb = b.scores(wc, FocusState(_Hist(ids), ids.numel(), query, "generate"))
    assert tree.lexical is not None and tree.lexical.num_blocks == ids.numel() // 32
    torch.testing.assert_close(sa, sb)
    assert torch.equal(a.last_targets, b.last_targets) and int(a.last_targets.max()) == 3000 // 32
    tree.close()
