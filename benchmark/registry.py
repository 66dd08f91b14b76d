"""Method registry: built-ins, the `benchmark.methods` entry-point group, and `pkg.module:Class`.

A method is a class with a `Params` dataclass (hyperparameters with defaults), a
constructor `__init__(self, params, ctx)`, `fit(self, data: TrainData)` and
`rank(self, request: RankRequest) -> RankedLists`. Register it with
`@register_method("name")`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmark.errors import ConfigError
from benchmark.types import RankedLists, RankRequest, TrainData

ENTRY_POINT_GROUP = "benchmark.methods"


@dataclass
class RunContext:
    """What the runner hands a method: seed, device, a work directory, and a validation scorer.

    `validate(ranked)` scores a ranking of the validation users (metric means, e.g.
    {"ndcg@10": ...}); methods use it for early stopping without computing metrics themselves.
    """

    seed: int
    device: str
    work_dir: Path
    validate: Callable[[RankedLists], dict[str, float]]
    llm: str | None = None  # --llm: hub id, local directory or GGUF file for LLM methods
    dataset_loader: Callable[[str], Any] | None = None  # other datasets (CALRec stage 1)
    method_loader: Callable[..., Any] | None = None  # name -> a fitted classic method of this seed (LlamaRec, P2Rec first stages)
    progress: bool = True
    notes: dict[str, Any] = field(default_factory=dict)  # run-level facts a method reports
    # where a method may keep fitted models keyed by its own fingerprint (None: no caching,
    # e.g. under --force); SASRec uses it so a first stage is trained once across runs
    cache_dir: Path | None = None

    def rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + offset)


class Method:
    """Base class (optional): subclasses set `Params` and implement fit/rank."""

    name: str = ""
    Params: type = type("Params", (), {})
    uses_llm: bool = False

    def __init__(self, params: Any, ctx: RunContext):
        self.params = params
        self.ctx = ctx

    @classmethod
    def check_params(cls, params: Any) -> None:
        """Optional: reject settings that name things which do not exist (another method, a
        dataset) before a run starts any work; raise ConfigError with the fix."""

    def fit(self, data: TrainData) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def rank(self, request: RankRequest) -> RankedLists:  # pragma: no cover - interface
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_method("sasrec")`."""

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
            raise TypeError(f"method {name!r}: {cls.__name__}.Params must be a dataclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ConfigError(f"method name {name!r} is registered twice ({existing} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    import baselines  # noqa: F401  (each module registers itself on import)


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not hide the built-ins
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        if isinstance(obj, type) and ep.name not in _REGISTRY:
            if not getattr(obj, "name", ""):
                register_method(ep.name)(obj)
            else:
                _REGISTRY.setdefault(ep.name, obj)


def available_methods() -> dict[str, type]:
    _load_builtins()
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def builtin_methods() -> dict[str, type]:
    """The methods this repository ships (baselines/), by name."""
    return {name: cls for name, cls in available_methods().items() if cls.__module__.startswith("baselines.")}


def get_method(name: str) -> type:
    """Resolve a method name, an entry point, or `package.module:Class`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import {module_name!r} for method {name!r}: {exc}") from exc
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise ConfigError(f"{module_name!r} has no class {attr!r}; give --methods package.module:Class")
        if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
            raise ConfigError(f"{name}: the class needs a dataclass attribute `Params` (its hyperparameters)")
        if not getattr(cls, "name", ""):
            cls.name = attr.lower()
        return cls
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(methods)} (or give package.module:Class)")
    return methods[name]


def method_label(name: str) -> str:
    """The name a method's results are stored and shown under."""
    return get_method(name).name if ":" in name else name
