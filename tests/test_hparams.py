"""hp() declarations: bounds, choices and finiteness are checked for every method at resolve time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from benchmark.config import parse_sets, resolve_params
from benchmark.errors import ConfigError
from benchmark.hparams import fields_with_role, hp, sources


@dataclass
class P:
    lr: float = hp(1e-3, gt=0, source="paper, section 4")
    epochs: int = hp(3, ge=1)
    mode: str = hp("a", choices=("a", "b"))
    threads: int = hp(0, ge=0, role="harness")
    beams: int = hp(5, ge=1, role="infer")
    plain: float = 0.5


def resolve(*sets: str) -> P:
    return resolve_params("m", P, parse_sets(list(sets)))


def test_defaults_pass_and_sources_are_listed():
    p = resolve()
    assert p.lr == 1e-3 and p.epochs == 3
    assert sources(P) == {"lr": "paper, section 4"}
    assert fields_with_role(p, "train") == ["lr", "epochs", "mode", "plain"]
    assert fields_with_role(p, "infer") == ["beams"]


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("m.lr=-1", "m.lr=-1.0: must be > 0"),
        ("m.lr=0", "must be > 0"),
        ("m.lr=nan", "finite"),
        ("m.plain=inf", "finite"),
        ("m.epochs=0", "m.epochs=0: must be >= 1"),
        ("m.mode=c", "must be one of a, b"),
        ("m.threads=-2", ">= 0"),
    ],
)
def test_bad_values_name_the_field_and_the_rule(setting, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        resolve(setting)
