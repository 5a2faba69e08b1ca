"""Span arithmetic: scalar and tensor forms agree; parent/children are inverse; spans tile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megacontext.core import lod as spans


@given(level=st.integers(0, 6), index=st.integers(0, 10_000))
def test_scalar_and_tensor_forms_agree(level, index):
    lv, ix = torch.tensor([level]), torch.tensor([index])
    assert spans.span_tensor(lv).item() == spans.span(level)
    assert spans.cost_tensor(lv).item() == spans.cost(level)
    assert spans.centre_tensor(lv, ix).item() == spans.centre(level, index)
    start, end = spans.token_span(level, index)
    assert start <= spans.centre(level, index) < end


@given(level=st.integers(1, 6), index=st.integers(0, 1000))
def test_children_tile_parent_span_and_point_back(level, index):
    child_level, kids = spans.children(level, index)
    start, end = spans.token_span(level, index)
    assert spans.token_span(child_level, kids[0])[0] == start
    assert spans.token_span(child_level, kids[-1])[1] == end
    for k in kids:
        assert spans.parent(child_level, k) == (level, index)


def test_bad_levels_raise():
    with pytest.raises(ValueError, match=f"level={spans.MAX_LEVEL + 1}"):
        spans.span(spans.MAX_LEVEL + 1)
    with pytest.raises(ValueError):
        spans.parent(spans.MAX_LEVEL, 0)
    with pytest.raises(ValueError):
        spans.children(0, 0)
    assert spans.complete_entries(2047, 2) == 1 and spans.complete_entries(2047, 1) == 63


@given(blocks=st.integers(0, 10**12), top=st.integers(1, 8))
def test_coarsest_cost_is_the_digit_sum_and_counts_tile_the_prefix(blocks, top):
    counts = spans.coarsest_counts(blocks, top)
    assert sum(counts) == spans.coarsest_cost(blocks, top)
    assert sum(c * spans.BLOCK ** i for i, c in enumerate(counts)) == blocks
    assert spans.coarsest_cost_tensor(torch.tensor([blocks]), top).item() == spans.coarsest_cost(blocks, top)


@given(target=st.integers(0, 400), top=st.integers(1, 6))
def test_smallest_with_cost_is_the_first_block_count_reaching_the_cost(target, top):
    b = spans.smallest_with_cost(target, top)
    assert spans.coarsest_cost(b, top) >= target
    if b < 200_000:  # exhaustive below it
        assert all(spans.coarsest_cost(x, top) < target for x in range(b))
    elif b > 0:
        assert spans.coarsest_cost(b - 1, top) < target


def test_num_levels_grows_with_the_history():
    assert [spans.num_levels(n) for n in (0, 31, 32, 1023, 1024, 32_767, 32_768, 32**4)] == [0, 0, 2, 2, 3, 3, 4, 5]
