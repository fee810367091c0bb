"""CPU and memory amounts as people write them, parsed as the Rust CLI does
(client-cli/src/quantity.rs): the server counts CPU in millicores and memory in MiB.

CPU: ``2`` / ``0.5`` are cores, ``500m`` millicores; a bare number above 64 is refused (it
was probably meant as millicores). Memory: a bare number is MiB; ``2GiB``, ``2Gi``, ``512MiB``,
``64Ki`` are binary units, ``1GB``, ``1G``, ``100MB``, ``100M``, ``4096B`` decimal ones and
bytes; bytes are rounded up to whole MiB.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Tuple

MAX_BARE_CORES = 64
_MIB = 1 << 20
_UNITS = {
    "": _MIB, "mi": _MIB, "mib": _MIB, "b": 1, "k": 1000, "kb": 1000, "ki": 1 << 10,
    "kib": 1 << 10, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "gi": 1 << 30,
    "gib": 1 << 30, "t": 10**12, "tb": 10**12, "ti": 1 << 40, "tib": 1 << 40,
}


def parse_cpu_milli(s: str) -> int:
    """``"2"`` -> 2000, ``"0.25"`` -> 250, ``"250m"`` -> 250; ``ValueError`` otherwise."""
    t = s.strip()
    if not t:
        raise ValueError("an empty CPU amount: write cores (2, 0.5) or millicores (500m)")
    if t.endswith("m"):
        m = t[:-1].strip()
        if not m.isdigit():
            raise ValueError(f"{s!r} is not a CPU amount: millicores are a whole number, e.g. 500m")
        return int(m)
    try:
        cores = Decimal(t)
    except InvalidOperation:
        raise ValueError(f"{s!r} is not a CPU amount: write cores (2, 0.5) or millicores (500m)") \
            from None
    if not cores.is_finite() or cores < 0:
        raise ValueError(f"{s!r} is not a CPU amount: it must be zero or more")
    if cores > MAX_BARE_CORES:
        raise ValueError(f"{s!r} would ask for {t} cores; for millicores write {t}m "
                         "(plain numbers are cores, as in Kubernetes)")
    milli = cores * 1000
    if milli != milli.to_integral_value():
        raise ValueError(f"{s!r} is finer than a millicore")
    return int(milli)


def parse_mem_mib(s: str) -> int:
    """``"512"`` -> 512, ``"2GiB"`` -> 2048, ``"1G"`` -> 954 (rounded up); ``ValueError``."""
    t = s.strip()
    i = 0
    while i < len(t) and (t[i].isdigit() or t[i] == "."):
        i += 1
    num, unit = t[:i], t[i:].strip().lower()
    bad = (f"{s!r} is not a memory size: write MiB (512) or a number with a unit "
           "(2GiB, 512Mi, 1G, 100MB)")
    if not num or unit not in _UNITS or num.count(".") > 1 or num == ".":
        raise ValueError(bad)
    whole, _, frac = num.partition(".")
    digits = int(whole + frac)
    scale = 10 ** len(frac)
    return -(-digits * _UNITS[unit] // (scale * _MIB))


def parse_key_value(s: str) -> Tuple[str, str]:
    """``"zone=eu"`` -> ("zone", "eu")."""
    k, sep, v = s.partition("=")
    if not sep or not k.strip():
        raise ValueError(f"{s!r} is not KEY=VALUE")
    return k.strip(), v


def parse_key_count(s: str) -> Tuple[str, int]:
    """``"gpu=2"`` -> ("gpu", 2)."""
    k, v = parse_key_value(s)
    if not v.strip().isdigit():
        raise ValueError(f"{s!r}: {v!r} is not a whole number")
    return k, int(v.strip())


__all__ = ["parse_cpu_milli", "parse_mem_mib", "parse_key_value", "parse_key_count"]
