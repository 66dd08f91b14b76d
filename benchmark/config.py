"""Hyperparameter layering: dataclass defaults < TOML config file < `--set method.field=value`."""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError
from benchmark.hparams import check_params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


_NONE_WORDS = ("none", "None", "null")


def parse_value(text: str) -> Any:
    """`--set` values: JSON/TOML literals (true, 3, 0.1, "x", [1,2]) or a bare string."""
    lowered = text.strip()
    if lowered in ("true", "True"):
        return True
    if lowered in ("false", "False"):
        return False
    if lowered in _NONE_WORDS:
        return None
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


class SetText(str):
    """A `--set` value as typed; `resolve_params` parses it against the field's type.

    So `--set sft.early_stopping=none` stays the string "none" for a `str` field, while
    `--set p2rec.llm=none` is None for an optional field and `--set sasrec.hidden=128` an int.
    """


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """["sasrec.hidden=128", "sft.lora=false"] -> {"sasrec": {"hidden": "128"}, "sft": {"lora": "false"}}.

    Values stay text (`SetText`) until `resolve_params` knows each field's type.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not eq or not dot or not method or not name:
            raise ConfigError(f"bad --set {item!r}; write --set METHOD.FIELD=VALUE, e.g. --set sasrec.hidden=128")
        out.setdefault(method.strip(), {})[name.strip()] = SetText(value)
    return out


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A TOML file with one table per method: [sasrec] hidden = 128."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a TOML file to --config")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; give an existing TOML file to --config")
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (a binary file?); give a TOML file to --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"config file {p}: top-level key {key!r} must be a table like [{key}]")
    return data


def _coerce(cls_name: str, field: dataclasses.Field, value: Any, hints: dict[str, Any]) -> Any:
    hint = hints.get(field.name, field.type)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        # None, or the word the field's declaration gives None (e.g. "all" examples)
        label = str((field.metadata.get("hp") or {}).get("none") or "").strip().lower()
        words = set(_NONE_WORDS) | ({label} if label and " " not in label else set())
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip() in words)):
            return None
        hint = next((a for a in args if a is not type(None)), hint)
    if isinstance(value, SetText):  # typed text from --set: a str field keeps it verbatim
        value = str(value) if hint is str else parse_value(value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            if isinstance(value, list):
                return ",".join(str(v) for v in value)
            return str(value)
        if typing.get_origin(hint) in (list, tuple) and isinstance(value, str):
            return typing.get_origin(hint)(v for v in value.split(",") if v)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls_name}.{field.name}={value!r}: {exc}") from exc
    return value


def resolve_params(method: str, params_cls: type, *layers: dict[str, dict[str, Any]]) -> Any:
    """Build the Params dataclass for `method` from its defaults and each override layer in order."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer.get(method) or {}).items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "no hyperparameters"
                raise ConfigError(f"unknown hyperparameter {method}.{key}; {method} has: {known}")
            values[key] = _coerce(method, fields[key], value, hints)
    try:
        params = params_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{method}: {exc}") from exc
    check_params(method, params)
    return params


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_key(params: Any) -> dict[str, Any]:
    """`params` as a dict for cache keys and fingerprints.

    A Params class may name the fields added after its cached artefacts were first keyed in
    a class attribute `ADDED_LATER`: a mapping from each such field to the value the code
    behaved as before the field existed. A field holding that value is left out, so models
    cached before it existed are still found; any other value is keyed. Mapping to the legacy
    value rather than the current default keeps keys distinct when a subclass changes the
    defaults (a preset).
    """
    values = dataclasses.asdict(params)
    for name, legacy in getattr(type(params), "ADDED_LATER", {}).items():
        if name in values and values[name] == legacy:
            del values[name]
    return values


def key_params(params: Any) -> dict[str, Any]:
    """The settings that key a result: `params_key` without the harness fields (threads,
    inference batch sizes, memory-saving switches), which change no result."""
    from benchmark.hparams import fields_with_role

    harness = set(fields_with_role(params, "harness"))
    return {k: v for k, v in params_key(params).items() if k not in harness}
