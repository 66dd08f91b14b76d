"""Hyperparameters declared once, with their checks and their sources.

A method's `Params` dataclass declares each field with `hp(...)`: the default, the values
it may take, where the default comes from, and what the field shapes. The checks run for
every method when its parameters are resolved (`check_params`), so no `fit` repeats them.

    lr: float = hp(1e-4, gt=0, source="itsmeyjt/CFT train.py: learning_rate=1e-4")
    num_beams: int = hp(5, ge=1, role="infer", source="...")
    num_threads: int = hp(0, ge=0, role="harness")

role:
- "train" (default): changes the fitted model (cache keys of fitted models include it);
- "infer": changes only how a fitted model ranks (another value reuses the trained model);
- "harness": changes neither result nor model (threads, batch sizes of pure inference
  loops, progress); left out of recipe departures.

A float field must be finite unless it says `finite=False`. Fields declared with plain
defaults (third-party methods) still get the finiteness check.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterable

from benchmark.errors import ConfigError

ROLES = ("train", "infer", "harness")
_MISSING = dataclasses.MISSING


def hp(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    role: str = "train",
    source: str | None = None,
    reference: Any = _MISSING,
    why: str | None = None,
    finite: bool = True,
    none: str | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field with bounds (ge/gt/le/lt), allowed `choices`, a `role` and a `source`.

    `source` cites where the reference value comes from (file and line, or paper section).
    When this harness cannot use the reference value at all (a component it does not
    implement), give that value as `reference=` and the reason as `why=`: the default then
    departs from the recipe on every device, and every run names that departure.
    `none` is how a None value reads in recipe tables and departures (e.g. "all").
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if (reference is not _MISSING) != (why is not None):
        raise ValueError("hp(): give `reference=` and `why=` together")
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "role": role, "source": source, "finite": finite,
            "choices": None if choices is None else tuple(choices), "why": why, "none": none}
    if reference is not _MISSING:
        meta["reference"] = reference
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"hp": meta})
    return dataclasses.field(default=default, metadata={"hp": meta})


def field_meta(field: dataclasses.Field) -> dict[str, Any]:
    """The hp() metadata of a field ({} for a plain field)."""
    return dict(field.metadata.get("hp", {})) if field.metadata else {}


def role(params_cls: type, name: str) -> str:
    for f in dataclasses.fields(params_cls):
        if f.name == name:
            return field_meta(f).get("role", "train")
    raise KeyError(name)


def fields_with_role(params: Any, *roles: str) -> list[str]:
    """Names of the fields whose role is one of `roles` (plain fields count as "train")."""
    return [f.name for f in dataclasses.fields(params) if field_meta(f).get("role", "train") in roles]


def sources(params_cls: type) -> dict[str, str]:
    """Field -> the source of its default value, for the fields that declare one."""
    return {f.name: field_meta(f)["source"] for f in dataclasses.fields(params_cls) if field_meta(f).get("source")}


def reference_value(params_cls: type, name: str) -> Any:
    """The recipe's own value of a field: `reference=` if declared, else the default."""
    for f in dataclasses.fields(params_cls):
        if f.name == name:
            meta = field_meta(f)
            if "reference" in meta:
                return meta["reference"]
            if f.default is not _MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def _bound_text(meta: dict[str, Any]) -> str:
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]:g}")
    return " and ".join(parts)


def _is_float_field(hint: Any) -> bool:
    if hint is float:
        return True
    args = typing.get_args(hint)
    return bool(args) and float in args and all(a in (float, type(None), int) for a in args)


def check_params(method: str, params: Any) -> None:
    """Raise ConfigError naming `method.field`, the bad value and what is allowed."""
    hints = typing.get_type_hints(type(params))
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        meta = field_meta(f)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value) and meta.get("finite", True):
            raise ConfigError(f"{method}.{f.name}={value!r}: must be a finite number")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{method}.{f.name}={value!r}: must be one of {allowed}")
        if not isinstance(value, (int, float)):
            continue
        bad = (
            (meta.get("gt") is not None and not value > meta["gt"])
            or (meta.get("ge") is not None and not value >= meta["ge"])
            or (meta.get("lt") is not None and not value < meta["lt"])
            or (meta.get("le") is not None and not value <= meta["le"])
        )
        if bad:
            raise ConfigError(f"{method}.{f.name}={value!r}: must be {_bound_text(meta)}")
        if _is_float_field(hints.get(f.name)) and not math.isfinite(float(value)):
            raise ConfigError(f"{method}.{f.name}={value!r}: must be a finite number")
