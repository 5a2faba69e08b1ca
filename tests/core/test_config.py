"""Config mixin: YAML/dict/CLI round trips and validation messages."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from megacontext.core.config import Config, ConfigError, add_config_args, check, config_from_args


@dataclass
class Inner(Config):
    width: int = 8
    mode: str = "absolute"

    def __post_init__(self):
        check(self.width > 0, f"width={self.width} must be > 0")


@dataclass
class Outer(Config):
    steps: int = 10
    lr: float = 1e-3
    compile: bool = False
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_dict_and_yaml_round_trip(tmp_path):
    cfg = Outer.from_dict({"steps": 5, "inner": {"width": 4}, "sizes": [3, 4]})
    assert cfg.steps == 5 and cfg.inner.width == 4 and cfg.sizes == (3, 4)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert Outer.from_yaml(path) == cfg


def test_unknown_key_and_bad_value_are_named(tmp_path):
    with pytest.raises(ConfigError, match="stepz"):
        Outer.from_dict({"stepz": 1})
    with pytest.raises(ConfigError, match="width=0"):
        Outer.from_dict({"inner": {"width": 0}})
    with pytest.raises(ConfigError, match="does not exist"):
        Outer.from_yaml(tmp_path / "missing.yaml")


def test_cli_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr: 0.5\ninner:\n  width: 3\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser, Outer)
    args = parser.parse_args(["--lr", "0.1", "--compile", "true", "--inner.mode", "compact", "--sizes", "5", "6"])
    cfg = config_from_args(Outer, args, str(path))
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.sizes) == (7, 0.1, True, (5, 6))
    assert (cfg.inner.width, cfg.inner.mode) == (3, "compact")


@dataclass
class _Documented(Config):
    rate: float = 0.5  # share of 100% that is kept
    plain: int = 3


def test_cli_help_is_the_field_comment():
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Documented)
    text = parser.format_help()  # would raise on an unescaped '%'
    assert "share of 100% that is kept (default: 0.5)" in " ".join(text.split())
    assert "(default: 3)" in text
