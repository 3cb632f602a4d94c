"""Memory: total and available RAM from the root's `proc/meminfo`."""

from __future__ import annotations

import re

from agent.hardware.devroot import DeviceRoot
from registry.profile import MemoryInfo

_MEMINFO_LINE = re.compile(r"^(\w+):\s+(\d+)\s*(kB)?\s*$")


def detect_memory(dev: DeviceRoot) -> MemoryInfo:
    """Total and available bytes; 0 when meminfo is absent, available never above total."""
    fields: dict[str, int] = {}
    for line in (dev.read_text("proc/meminfo") or "").splitlines():
        if m := _MEMINFO_LINE.match(line.strip()):
            fields.setdefault(m.group(1), int(m.group(2)) * (1024 if m.group(3) else 1))
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14 lack MemAvailable
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return MemoryInfo(total_bytes=total, available_bytes=min(available, total))
