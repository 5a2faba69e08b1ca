"""Typed run configs: dataclasses with defaults that run, loadable from YAML and generated into CLI flags.

Every config in MegaContext is a dataclass that inherits :class:`Config`. One definition serves three
front ends: Python (``GistTrainConfig(steps=100)``), YAML (``GistTrainConfig.from_yaml(path)``) and the
CLI (``add_config_args`` turns each field into ``--field-name``; nested configs become
``--section.field-name``). Validation lives in each class's ``__post_init__`` and names the bad value;
before it, :meth:`Config.from_dict` (YAML, stored configs) checks every value against its field's type
(``k: abc`` for an int field is a :class:`ConfigError` naming ``k='abc'``, not a ``TypeError`` deep inside).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value or key is invalid."""


def check(cond: bool, msg: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError(msg) when cond is false."""
    if not cond:
        raise ConfigError(msg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config)


def _scalar_type(tp):
    """Reduce ``X | None`` to X; return (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _numeric(value: Any, tp: type) -> Any:
    """A YAML scalar for an int/float field: numbers as they are; numeric strings (YAML reads ``3e-4`` as a
    string) converted; anything else returned unchanged, for the caller to refuse."""
    if isinstance(value, str):
        try:
            return tp(value) if tp is int else float(value)
        except ValueError:
            return value
    return float(value) if tp is float and isinstance(value, int) and not isinstance(value, bool) else value


def _checked(owner: str, key: str, tp, optional: bool, value: Any) -> Any:
    """``value`` converted to field type ``tp`` where that is lossless; ConfigError naming the value otherwise."""
    if value is None and optional:
        return None
    origin = typing.get_origin(tp)
    ok = True
    if _is_config(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{owner}: {key}={value!r} must be a mapping of {tp.__name__} fields")
        return tp.from_dict(value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp in (int, float):
        value = _numeric(value, tp)
        ok = isinstance(value, tp) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is typing.Literal:
        ok = value in typing.get_args(tp)
    elif origin is tuple:
        inner = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, list | tuple):
            value = tuple(_checked(owner, f"{key}[{i}]", inner, False, v) for i, v in enumerate(value))
        else:
            ok = False
    if not ok:
        want = f"one of {list(typing.get_args(tp))}" if origin is typing.Literal else \
            f"a {getattr(tp, '__name__', str(tp))}" + (" or null" if optional else "")
        raise ConfigError(f"{owner}: {key}={value!r} must be {want}")
    return value


class Config:
    """Mixin for dataclass configs."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        """Build from a mapping (YAML, a stored config): unknown keys and values of the wrong type are refused
        with a ConfigError naming them; nested configs come as mappings."""
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
        data = dict(data or {})
        hints = _field_types(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; expected some of {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            tp, optional = _scalar_type(hints[key])
            kwargs[key] = _checked(cls.__name__, key, tp, optional, value)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: C, **changes) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


_FIELD = re.compile(r"^\s+(\w+)\s*:[^#=]*=[^#]*(?:#\s*(.+?))?\s*$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*?)\s*$")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The help text of each field in the class body: its trailing ``# comment``, else the block of comment
    lines right above it (for explanations too long for one line); {} without source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        c = _COMMENT_LINE.match(line)
        if c:
            above.append(c.group(1))
            continue
        m = _FIELD.match(line)
        if m and m.group(1) not in out and (m.group(2) or above):
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def config_dests(cls: type[Config], prefix: str = "") -> list[str]:
    """The argparse ``dest`` of every flag :func:`add_config_args` generates for ``cls`` (``wc.w_max``, ...)."""
    hints = _field_types(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp, _ = _scalar_type(hints[f.name])
        out += config_dests(tp, f"{prefix}{f.name}.") if _is_config(tp) else [f"{prefix}{f.name}"]
    return out


def add_config_args(parser: argparse.ArgumentParser, cls: type[Config], prefix: str = "") -> None:
    """Add one ``--flag`` per field (defaults left as None so YAML values are not overridden); the help text is
    the field's comment in the dataclass (:func:`field_comments`) plus its default."""
    hints = _field_types(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _scalar_type(hints[f.name])
        dest = f"{prefix}{f.name}"
        if _is_config(tp):
            add_config_args(parser, tp, prefix=f"{dest}.")
            continue
        flag = "--" + dest.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        helptext = f"{comments[f.name]} (default: {default!r})" if f.name in comments else f"(default: {default!r})"
        helptext = helptext.replace("%", "%%")  # argparse formats help strings with %
        if tp is bool:
            parser.add_argument(flag, dest=dest, type=_parse_bool, default=None, metavar="BOOL", help=helptext)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            parser.add_argument(flag, dest=dest, type=inner, nargs="+", default=None, help=helptext)
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=dest, type=tp, default=None, help=helptext)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=typing.get_args(tp), default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=str, default=None, help=helptext)


def config_from_args(cls: type[C], args: argparse.Namespace, yaml_path: str | None = None) -> C:
    """Build ``cls`` from parsed flags: explicit CLI flags override the YAML file (if any), which overrides the
    dataclass defaults. Parsed arguments that are not fields of ``cls`` are ignored."""
    base = cls.from_yaml(yaml_path).to_dict() if yaml_path else {}
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return cls.from_dict(_merge(cls, base, overrides, ""))


def _merge(cls, base: dict, flat: dict, prefix: str) -> dict:
    out = dict(base)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _scalar_type(hints[f.name])
        key = f"{prefix}{f.name}"
        if _is_config(tp):
            sub = _merge(tp, out.get(f.name) or {}, flat, key + ".")
            if sub:
                out[f.name] = sub
        elif key in flat:
            out[f.name] = flat[key]
    return out
