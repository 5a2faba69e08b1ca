"""Loss terms (vectorised vs naive) and the budget-balancing signed targets."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.lensnet.loss import LensLossConfig, budget_loss, lens_loss, ranking_loss
from megacontext.lensnet.targets import exchange_rate, signed_targets

NAN = float("nan")


def test_ranking_matches_naive_pairs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    lab = torch.rand(2, 6, generator=g) > 0.3
    tot, n = 0.0, 0
    for b in range(2):
        for i in range(6):
            for j in range(6):
                if lab[b, i] and lab[b, j] and t[b, i] - t[b, j] > 0.1:
                    tot += math.log1p(math.exp(-(s[b, i] - s[b, j])))
                    n += 1
    assert abs(float(ranking_loss(s, t, lab, 0.1)) - tot / n) < 1e-5


def test_ranking_prefers_correct_order():
    t = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lab = torch.ones_like(t, dtype=torch.bool)
    assert ranking_loss(t, t, lab, 0.0) < ranking_loss(-t, t, lab, 0.0)


def test_budget_zero_when_balanced_positive_otherwise():
    s = torch.tensor([[5.0, -5.0, 0.0]])
    exp = torch.tensor([[True, False, False]])
    col = torch.tensor([[False, True, False]])
    m = torch.ones_like(exp)
    assert float(budget_loss(s, exp, col, m, 0.1)) < 1e-6
    assert float(budget_loss(torch.tensor([[5.0, 5.0, 0.0]]), exp, col, m, 0.1)) > 0.05


def test_lens_loss_ignores_unlabelled_targets():
    s = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[1.0, NAN, -1.0]])
    lab = ~t.isnan()
    out = lens_loss(s, t, lab, lab, lab, torch.ones_like(lab), LensLossConfig())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert s.grad[0, 1] == 0


def _naive_trades(gains, losses):
    g = sorted([x for x in gains if not math.isnan(x)], reverse=True)
    c = sorted([x for x in losses if not math.isnan(x)])
    return sum(1 for a, b in zip(g, c, strict=False) if a > b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["gain", "loss", "none"]), st.floats(-1, 1)), min_size=1, max_size=12))
def test_signed_targets_balance_expansions_and_collapses(items):
    """Entries holding one label (gists: gain, LOD0 blocks: loss): a zero-threshold reading of the targets
    performs exactly the optimal number of gain > loss trades, as many expansions as collapses."""
    pairs = [(v if k == "gain" else None, v if k == "loss" else None) for k, v in items]
    gain = torch.tensor([[NAN if a is None else a for a, _ in pairs]])
    loss = torch.tensor([[NAN if b is None else b for _, b in pairs]])
    tgt, tau = signed_targets(gain, loss)
    k = _naive_trades(gain[0].tolist(), loss[0].tolist())
    n_exp = int(((tgt > 0) & ~gain.isnan() & (gain > tau[:, None])).sum())
    n_col = int(((tgt < 0) & ~loss.isnan() & (loss < tau[:, None])).sum())
    # ties can sit exactly on tau; with continuous floats the counts equal the optimal trade count
    if len(set(gain[0][~gain[0].isnan()].tolist()) | set(loss[0][~loss[0].isnan()].tolist())) == \
            int((~gain.isnan()).sum() + (~loss.isnan()).sum()):
        assert n_exp == k and n_col == k
    assert torch.isnan(tgt[0]).tolist() == [a is None and b is None for a, b in pairs]


def test_exchange_rate_example():
    g = torch.tensor([[0.5, 0.1, NAN, NAN]])
    c = torch.tensor([[NAN, NAN, 0.05, 0.3]])
    assert abs(float(exchange_rate(g, c)[0]) - 0.2) < 1e-6
