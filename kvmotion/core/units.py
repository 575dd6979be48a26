"""Parsing and formatting of sizes, rates and durations given by users ("512M", "1G", "300ms")."""

from __future__ import annotations

import re

from kvmotion.core.errors import InvalidInput

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Bytes in a size such as '512M', '2G', '1.5GiB', '4096' (binary units, as QEMU reads them)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidInput(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 512M)")
    unit = (m.group(2) or default_unit).lower()
    return int(float(m.group(1)) * _SIZE_MULT[unit])


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps|b)?(/s)?\s*$", re.IGNORECASE)
_DEC_MULT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(text: str) -> int:
    """Bytes per second in a link or dirty rate.

    '1gbit' and '10Gbit' are bits per second (decimal, as tc and Ethernet say); '100M' and
    '1G' without 'bit' are bytes per second (decimal, as the brief says "1 GB/s").
    """
    m = _RATE_RE.match(str(text))
    if not m:
        raise InvalidInput(f"invalid rate {text!r}: use e.g. 100M (bytes/s) or 1gbit (bits/s)")
    value = float(m.group(1)) * _DEC_MULT[m.group(2).lower()]
    if (m.group(3) or "").lower() in ("bit", "bps"):  # bps is bits per second, as on network gear
        value /= 8
    return int(value)


_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|us)?\s*$", re.IGNORECASE)
_DUR_MULT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, default_unit: str = "s") -> float:
    """Seconds in a duration such as '300ms', '2s', '1.5m'."""
    m = _DUR_RE.match(str(text))
    if not m:
        raise InvalidInput(f"invalid duration {text!r}: use e.g. 300ms, 2s or 5m")
    return float(m.group(1)) * _DUR_MULT[(m.group(2) or default_unit).lower()]


def format_size(n: float) -> str:
    """Human binary size: 536870912 -> '512.0 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Human duration: 0.0123 -> '12 ms', 75 -> '1m15s'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
