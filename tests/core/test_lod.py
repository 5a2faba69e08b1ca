"""Span arithmetic: scalar and tensor forms agree; parent/children are inverse; spans tile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megacontext.core import lod as spans


@given(level=st.integers(0, 2), index=st.integers(0, 10_000))
def test_scalar_and_tensor_forms_agree(level, index):
    lv, ix = torch.tensor([level]), torch.tensor([index])
    assert spans.span_tensor(lv).item() == spans.span(level)
    assert spans.cost_tensor(lv).item() == spans.cost(level)
    assert spans.centre_tensor(lv, ix).item() == spans.centre(level, index)
    start, end = spans.token_span(level, index)
    assert start <= spans.centre(level, index) < end


@given(level=st.integers(1, 2), index=st.integers(0, 1000))
def test_children_tile_parent_span_and_point_back(level, index):
    child_level, kids = spans.children(level, index)
    start, end = spans.token_span(level, index)
    assert spans.token_span(child_level, kids[0])[0] == start
    assert spans.token_span(child_level, kids[-1])[1] == end
    for k in kids:
        assert spans.parent(child_level, k) == (level, index)


def test_bad_levels_raise():
    with pytest.raises(ValueError, match="level=3"):
        spans.span(3)
    with pytest.raises(ValueError):
        spans.parent(2, 0)
    with pytest.raises(ValueError):
        spans.children(0, 0)
    assert spans.complete_entries(2047, 2) == 1 and spans.complete_entries(2047, 1) == 63
