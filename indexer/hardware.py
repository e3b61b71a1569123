"""What the processor can do fast, read from its flags at run time (no torch: ``info`` and benches ask too).

Machines of one fleet differ (we have seen AMD Zen 5 and Intel Xeon with AMX on the same job), so fast
paths are chosen by what this CPU reports, never by assumption.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Flags meaning the CPU multiplies bf16 matrices in hardware: Intel AMX tiles, or AVX-512 BF16 (Intel
# Cooper Lake and later, AMD Zen 4 and later). Without them bf16 is emulated and slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def _cpuinfo(*keys: str) -> str | None:
    """The value of the first line of Linux's ``/proc/cpuinfo`` whose key is one of ``keys`` (the first
    processor's); None where there is no such line or the file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm); empty where they cannot be read."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def bf16_units(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 matrix units this CPU has, by flag name (empty: none, keep fp32)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in BF16_FLAGS if flag in flags]
