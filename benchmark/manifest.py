"""What a run records about where it ran: versions, git commit, device, memory."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import benchmark

PACKAGES = ("numpy", "pandas", "scipy", "torch", "transformers", "peft", "sentence-transformers")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"benchmark": benchmark.__version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the repository holding this package ("+dirty" when it has local changes)."""
    root = Path(benchmark.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def resolve_device(device: str = "auto", option: str = "--device") -> str:
    """auto -> cuda where available, else cpu; cpu, cuda and cuda:N are checked against this machine.

    Anything else (tpu, a typo) is a ConfigError naming `option` and the accepted values."""
    import torch

    from benchmark.errors import ConfigError

    name = device.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"{option}={device}: unknown device; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{option}={device}: CUDA is not available here; use cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{option}={device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return name


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as figures must name it: model name and number, cores, and which native bf16 units it
    has (bf16 results differ in rounding between AMX, AVX512-BF16 and emulation, and so do speeds).
    Falls back on platform's names where /proc/cpuinfo cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("model"):
        name += f", family {fields.get('cpu family', '?')} model {fields['model']}"
    flags = set(fields.get("flags", "").split())
    bf16 = [f for f in BF16_FLAGS if f in flags]
    native = f"bf16: {', '.join(bf16)}" if bf16 else ("no native bf16" if flags else "flags unknown")
    return f"{name} ({os.cpu_count()} cores; {native})"


def _hwm_kb() -> float | None:
    """This process's peak resident set since its last reset (VmHWM), in KiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: str) -> None:
    """Start a unit's peak-memory window: the CUDA allocator's peak on the unit's own device,
    and the peak resident set (Linux: /proc/self/clear_refs, as `echo 5` resets VmHWM)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process since `reset_peak_memory` (the whole process's
    where the reset is not available), and peak CUDA memory on `device` where used."""
    hwm = _hwm_kb()
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss_mb": rss / 1024.0}
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out


def manifest(device: str, processes: int = 1) -> dict:
    import torch

    return {
        "processes": processes,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
    }
