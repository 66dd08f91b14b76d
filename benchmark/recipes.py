"""Recipes and budgets: what a method's defaults are, and every way a run departs from them.

A method's **recipe** is its `Params` defaults: the reference values (paper or reference
code), each declared with `hp(..., source=...)`. A field the harness cannot set to the
reference value on any device (a component it does not implement) declares the reference
value as `hp(..., reference=..., why=...)`.

A **budget** is a named set of departures with one reason (`Budget`), declared by the
method class in `BUDGETS`, e.g. SFT's "cpu": 2,048 training examples instead of all, LoRA
instead of full fine-tuning, because a 2-core CPU cannot run the reference in hours.
"reference" is the budget with no departures. The device picks the default budget
("cpu" on a CPU where the method declares one, else "reference"); `--budget NAME` or
`--set LABEL.budget=NAME` picks another.

Layering: recipe (dataclass defaults) < budget < `--config` < `--set` < hardware (bf16 is
replaced by fp32 where the device has no native bf16). `resolve_recipe` returns the
parameters and the list of `Departure`s (field, reference value, value used, why), which the
run prints, the unit's config stores, the unit key includes and the leaderboard shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from benchmark.config import resolve_params
from benchmark.errors import ConfigError
from benchmark.hparams import field_meta, reference_value

REFERENCE = "reference"
AUTO = "auto"


@dataclass(frozen=True)
class Budget:
    """A named set of departures from a recipe, with the one reason they are made."""

    reason: str
    changes: Mapping[str, Any]


@dataclass(frozen=True)
class Departure:
    """One setting that differs from the reference recipe, and why."""

    field: str
    reference: Any
    used: Any
    why: str  # "budget cpu", "--set/--config", "hardware", or a permanent reason
    detail: str = ""

    none: str | None = None  # how None reads for this field

    def text(self) -> str:
        used, ref = _fmt(self.used, self.none), _fmt(self.reference, self.none)
        return f"{self.field}={used} instead of {ref} ({self.why})"

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "reference": self.reference, "used": self.used, "why": self.why,
                "detail": self.detail}


@dataclass
class Resolved:
    """A method ready to run: class, label, resolved parameters and how they depart from the recipe."""

    cls: type
    label: str
    params: Any
    budget: str
    version: int
    departures: list[Departure] = field(default_factory=list)

    @property
    def budget_reason(self) -> str:
        budget = getattr(self.cls, "BUDGETS", {}).get(self.budget)
        return budget.reason if budget is not None else ""

    def note(self) -> str:
        """One line for the run's output and the leaderboard's method notes."""
        head = f"{self.label}: recipe v{self.version}"
        if self.budget != REFERENCE:
            head += f", budget {self.budget}"
        if not self.departures:
            return head + ", no departures"
        return head + "; departs: " + "; ".join(d.text() for d in self.departures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "budget": self.budget,
            "budget_reason": self.budget_reason,
            "reference": getattr(self.cls, "REFERENCE", ""),
            "departures": [d.to_dict() for d in self.departures],
            "note": self.note(),
        }


def _fmt(value: Any, none: str | None = None) -> str:
    if value is None:
        return none or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


# -- hardware -----------------------------------------------------------------------------------


def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX (read from /proc/cpuinfo; False where that cannot be read)."""
    if device_type.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return cpu_has_bf16()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _hardware_changes(params: Any, device_type: str) -> dict[str, tuple[Any, str]]:
    """Settings the device forces: a `precision` field of "bf16" becomes "fp32" without native bf16."""
    names = {f.name for f in dataclasses.fields(params)}
    if "precision" in names and getattr(params, "precision") == "bf16" and not native_bf16(device_type):
        where = "GPU" if device_type.startswith("cuda") else "CPU"
        return {"precision": ("fp32", f"this {where} has no native bf16 (AVX512-BF16/AMX or a bf16 GPU)")}
    return {}


# -- resolution -------------------------------------------------------------------------------


def default_budget(cls: type, device_type: str) -> str:
    budgets = getattr(cls, "BUDGETS", {}) or {}
    if not device_type.startswith("cuda") and "cpu" in budgets:
        return "cpu"
    return REFERENCE


def pick_budget(cls: type, label: str, requested: str, explicit_for_label: bool, device_type: str) -> str:
    """The budget a method runs under: `requested` (a name, "reference" or "auto")."""
    budgets = getattr(cls, "BUDGETS", {}) or {}
    if requested in (AUTO, ""):
        return default_budget(cls, device_type)
    if requested == REFERENCE or requested in budgets:
        return requested
    if not budgets and not explicit_for_label:
        return REFERENCE  # a run-wide --budget leaves methods without budgets on their recipe
    known = ", ".join([REFERENCE, *budgets]) if budgets else REFERENCE
    raise ConfigError(f"{label} has no budget {requested!r}; its budgets: {known} (or auto)")


def resolve_recipe(
    cls: type,
    label: str,
    overrides: Mapping[str, Mapping[str, Any]],
    *,
    device_type: str = "cpu",
    budget: str = AUTO,
    llm: str | None = None,
) -> Resolved:
    """Recipe < budget < overrides (--config, --set) < hardware; returns params and departures.

    `llm` is the run's --llm: an `llm` field left at None uses it, and the departure names it."""
    own = dict(overrides.get(label) or {})
    explicit = "budget" in own
    name = pick_budget(cls, label, str(own.pop("budget", budget)).strip(), explicit, device_type)
    changes = dict(getattr(cls, "BUDGETS", {}).get(name, Budget("", {})).changes) if name != REFERENCE else {}
    params = resolve_params(label, cls.Params, {label: changes}, {label: own})
    hardware = _hardware_changes(params, device_type)
    if hardware:
        params = dataclasses.replace(params, **{k: v for k, (v, _) in hardware.items()})
    departures = []
    for f in dataclasses.fields(params):
        meta = field_meta(f)
        if meta.get("role", "train") == "harness":
            continue
        ref = reference_value(type(params), f.name)
        used = getattr(params, f.name)
        run_llm = f.name == "llm" and used is None and bool(llm)
        if run_llm:
            used = llm
        if _same(used, ref):
            continue
        if run_llm:
            why, detail = "--llm", ""
        elif f.name in hardware:
            why, detail = "hardware", hardware[f.name][1]
        elif f.name in own:
            why, detail = "--set/--config", ""
        elif f.name in changes:
            why, detail = f"budget {name}", getattr(cls, "BUDGETS")[name].reason
        elif meta.get("why"):
            why, detail = "not available here", meta["why"]
        else:  # a default that is not the reference and says no why: a declaration bug
            raise ConfigError(f"{label}.{f.name}: default {used!r} differs from its reference {ref!r} without a reason")
        departures.append(Departure(f.name, ref, used, why, detail, meta.get("none")))
    return Resolved(cls, label, params, name, int(getattr(cls, "RECIPE_VERSION", 1)), departures)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# -- the recipe table ---------------------------------------------------------------------------


def recipe_rows(cls: type) -> list[dict[str, Any]]:
    """Per result-shaping field: reference value and source, the GPU default, the CPU default.

    Hardware adaptation is left out (it depends on the machine: bf16 becomes fp32 on a CPU
    without native bf16, which the run reports)."""
    params_cls = cls.Params
    gpu = resolve_recipe_no_hw(cls, "cuda")
    cpu = resolve_recipe_no_hw(cls, "cpu")
    rows = []
    for f in dataclasses.fields(params_cls):
        meta = field_meta(f)
        if meta.get("role", "train") == "harness":
            continue
        rows.append({
            "field": f.name,
            "role": meta.get("role", "train"),
            "reference": _fmt(reference_value(params_cls, f.name), meta.get("none")),
            "source": meta.get("source") or "",
            "why": meta.get("why") or "",
            "gpu": _fmt(getattr(gpu, f.name), meta.get("none")),
            "cpu": _fmt(getattr(cpu, f.name), meta.get("none")),
        })
    return rows


def resolve_recipe_no_hw(cls: type, device_type: str) -> Any:
    name = default_budget(cls, device_type)
    changes = dict(cls.BUDGETS[name].changes) if name != REFERENCE else {}
    return resolve_params(cls.name or "method", cls.Params, {cls.name or "method": changes})


def render_markdown(classes: Mapping[str, type]) -> str:
    """The recipe table of every method: reference value and source, GPU and CPU defaults."""
    lines = [
        "# Method recipes",
        "",
        "Generated by `python -m benchmark recipes --markdown` (a test keeps this file equal to it).",
        "For every setting that shapes results: the reference value with its source, the default here on a",
        "GPU (the `reference` budget) and on a CPU (the `cpu` budget where the method has one). Where the",
        "default differs from the reference on every device, the reason is given. On a CPU without native",
        "bf16 (AVX512-BF16/AMX), `precision` bf16 runs as fp32 and the run names that departure.",
        "Sources: file:line at the commit named, or the notes in `baselines/sources/` for methods whose",
        "papers could not be read in full and have no public code (CALRec, P2Rec).",
        "",
    ]
    for name, cls in classes.items():
        budgets = getattr(cls, "BUDGETS", {}) or {}
        lines += [f"## {name} (recipe v{getattr(cls, 'RECIPE_VERSION', 1)})", ""]
        ref = getattr(cls, "REFERENCE", "")
        if ref:
            lines += [f"Reference: {ref}.", ""]
        for bname, budget in budgets.items():
            changes = ", ".join(f"{k}={_fmt(v)}" for k, v in budget.changes.items())
            lines += [f"Budget `{bname}`: {changes}. Why: {budget.reason}.", ""]
        lines += ["| setting | reference | source | GPU default | CPU default |", "|---|---|---|---|---|"]
        for row in recipe_rows(cls):
            source = row["source"] or "—"
            if row["why"]:
                source += f" **Departs everywhere:** {row['why']}."
            cells = [f"`{row['field']}`" + (" (inference)" if row["role"] == "infer" else ""), row["reference"],
                     source, row["gpu"], row["cpu"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
