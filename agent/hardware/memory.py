"""Memory: total and available RAM from the root's `proc/meminfo`, or "unknown"."""

from __future__ import annotations

import re

from agent.hardware.devroot import DeviceRoot
from registry.profile import MemoryInfo

_MEMINFO_LINE = re.compile(r"^(\w+):\s+(\d+)\s*(kB)?\s*$")


def detect_memory(dev: DeviceRoot) -> MemoryInfo:
    """Total and available bytes, available never above total.

    Without a readable `MemTotal` line both are None (unknown), not 0: a capture without
    meminfo says nothing about the RAM. Without `MemAvailable` (kernels before 3.14) the
    available figure is MemFree + Buffers + Cached, None when none of those is there.
    """
    fields: dict[str, int] = {}
    for line in (dev.read_text("proc/meminfo") or "").splitlines():
        if m := _MEMINFO_LINE.match(line.strip()):
            fields.setdefault(m.group(1), int(m.group(2)) * (1024 if m.group(3) else 1))
    total = fields.get("MemTotal")
    if total is None:
        return MemoryInfo(total_bytes=None, available_bytes=None)
    available = fields.get("MemAvailable")
    if available is None:
        parts = [fields[k] for k in ("MemFree", "Buffers", "Cached") if k in fields]
        available = sum(parts) if parts else None
    return MemoryInfo(total_bytes=total,
                      available_bytes=None if available is None else min(available, total))
