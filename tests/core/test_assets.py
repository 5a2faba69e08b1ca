"""Embedded-model resolution: $MEGACONTEXT_MODELS first, then the packaged folder, else one clear error."""

from __future__ import annotations

import pytest

from megacontext.core import assets
from megacontext.core.assets import ENV_VAR, AssetError, embedded, resolve


def test_packaged_models_are_found(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for name in assets.EMBEDDED:
        assert embedded(name) == assets.PACKAGED / name and (embedded(name) / "config.json").is_file()


def test_env_var_wins_and_falls_back_per_model(monkeypatch, tmp_path):
    (tmp_path / assets.GISTNET_MODEL).mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert embedded(assets.GISTNET_MODEL) == tmp_path / assets.GISTNET_MODEL
    assert embedded(assets.BASE_MODEL) == assets.PACKAGED / assets.BASE_MODEL  # not in the env dir: packaged


def test_missing_model_names_both_places(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "models"))
    monkeypatch.setattr(assets, "PACKAGED", tmp_path / "pkg")
    with pytest.raises(AssetError) as e:
        embedded(assets.LENSNET_MODEL)
    msg = str(e.value)
    assert "lensnet-19m-v2-lex" in msg and str(tmp_path / "models") in msg and str(tmp_path / "pkg") in msg
    with pytest.raises(AssetError, match="not an embedded model"):
        embedded("gpt-17")


def test_resolve_only_rewrites_embedded_names(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve(assets.BASE_MODEL) == str(assets.PACKAGED / assets.BASE_MODEL)
    assert resolve("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"  # a hub id passes through
    assert resolve(tmp_path) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / assets.BASE_MODEL).mkdir()  # a local folder of the same name is taken as the user's path
    assert resolve(assets.BASE_MODEL) == assets.BASE_MODEL
