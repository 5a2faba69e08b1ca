"""Checkpoints: round trip, refusal of another base model / kind, clear errors on malformed dirs."""

from __future__ import annotations

import pytest
import torch

from megacontext.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_refusals(tmp_path):
    net = torch.nn.Linear(4, 3)
    save_checkpoint(tmp_path / "ck", net, kind="gistnet", config={"a": 1}, base_fingerprint="abc", d_model=4)
    state, meta = load_checkpoint(tmp_path / "ck", kind="gistnet", base_fingerprint="abc", d_model=4)
    assert meta["config"] == {"a": 1}
    other = torch.nn.Linear(4, 3)
    other.load_state_dict(state)
    assert torch.equal(other.weight, net.weight)
    with pytest.raises(CheckpointError, match="fingerprint abc"):
        load_checkpoint(tmp_path / "ck", kind="gistnet", base_fingerprint="xyz")
    with pytest.raises(CheckpointError, match="'lensnet'"):
        load_checkpoint(tmp_path / "ck", kind="lensnet", base_fingerprint="abc")
    with pytest.raises(CheckpointError, match="d_model=4"):
        load_checkpoint(tmp_path / "ck", kind="gistnet", base_fingerprint="abc", d_model=8)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path, kind="gistnet", base_fingerprint=None)
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path / "ck", kind="gistnet", base_fingerprint=None)
