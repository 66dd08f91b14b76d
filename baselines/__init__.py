"""Built-in methods, one module each; importing a module registers its method."""

import importlib

BUILTIN_MODULES = ("random", "pop", "sasrec", "sasrec_v1", "sft", "cft", "bigrec", "llamarec", "calrec", "p2rec")


def _import_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(f"baselines.{name}")


_import_builtins()
