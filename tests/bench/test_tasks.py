"""Task generators: layout, determinism, and clear errors."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.tasks import (
    Meeting,
    TokenDoc,
    far_recall_samples,
    passkey_samples,
    perplexity_samples,
    qmsum_samples,
)


def _docs(n_docs=3, length=3000):
    g = torch.Generator().manual_seed(1)
    return [TokenDoc(f"d{i}", torch.randint(20, 120, (length,), generator=g)) for i in range(n_docs)]


def _encode(text: str) -> list[int]:  # one id per character, enough for layout checks
    return [ord(c) % 128 for c in text]


def test_far_recall_repeats_the_passage_at_the_distance():
    samples = far_recall_samples(_docs(), [512, 1024], per_distance=3, seed=5, passage_min=32, passage_max=64,
                                 lead=64)
    assert len(samples) == 6
    for s in samples:
        d, n = s.meta["distance"], s.meta["passage_len"]
        start = 64 + d
        assert torch.equal(s.tokens[start:start + n], s.tokens[64:64 + n])  # repeat == passage
        assert (s.target_start, s.target_end) == (start + 1, start + n)
    again = far_recall_samples(_docs(), [512, 1024], per_distance=3, seed=5, passage_min=32, passage_max=64, lead=64)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(samples, again, strict=True))


def test_passkey_targets_are_the_key_tokens():
    samples = passkey_samples(_docs(), _encode, [400], per_distance=2, seed=3, lead=32)
    for s in samples:
        key = str(s.meta["key"])
        assert s.tokens[s.target_start:s.target_end].tolist() == _encode(" " + key)
        assert s.tokens[s.target_start - len("\nThe pass key is"):s.target_start].tolist() == _encode(
            "\nThe pass key is")


def test_perplexity_and_qmsum_layout():
    pp = perplexity_samples(_docs(2, 100), max_tokens=64)
    assert [(s.target_start, s.target_end) for s in pp] == [(1, 64), (1, 64)]
    m = Meeting("m1", "A: hello\nB: hi", [("what?", "a greeting"), ("empty", "  ")])
    qs = qmsum_samples([m], _encode)
    assert len(qs) == 1  # empty answers are dropped
    assert qs[0].tokens[qs[0].target_start:].tolist() == _encode(" a greeting")


def test_far_recall_names_the_missing_length():
    with pytest.raises(ValueError, match="no document has"):
        far_recall_samples(_docs(length=600), [4096], per_distance=1)
