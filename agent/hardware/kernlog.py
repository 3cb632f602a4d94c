"""The kernel log, where a device root carries one: driver messages and loaded firmware.

Read under the root: `var/lib/edge-agent/capture/dmesg.txt` (what `dmesg` printed, in a
support bundle or a fixture tree), else `var/log/dmesg` (the boot log some distributions
keep). The live kernel ring buffer (`/dev/kmsg`) is not read: it is a character device,
usually restricted, and detection must not block or need privileges.

Each line is split into the driver and device a driver message names (`intel_vpu
0000:00:0b.0: ...`, `RKNPU fdab0000.npu: ...`) and the message; lines without that prefix
(`[drm] Initialized rknpu 0.9.5 ... for fdab0000.npu on minor 1`) keep driver and device
None. Timestamps (`[    2.9]`) and syslog prefixes (`<6>`) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.hardware.devroot import CAPTURE_DIR, DeviceRoot

KERNEL_LOG_FILES = (f"{CAPTURE_DIR}/dmesg.txt", "var/log/dmesg")

_PREFIX = re.compile(r"^(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?")
_DRIVER_DEVICE = re.compile(r"^([\w.-]+) ([\w.:@-]+): (.*)$")
_INITIALIZED = re.compile(r"\[drm\] Initialized (\S+) (\d+(?:\.\d+)+)\b.*? for (\S+) on minor")


@dataclass(frozen=True)
class LogLine:
    source: str
    driver: str | None
    device: str | None
    message: str


def kernel_log(root: DeviceRoot) -> list[LogLine]:
    """The first kernel log the root carries, line by line; empty without one."""
    for rel in KERNEL_LOG_FILES:
        text = root.read_text(rel)
        if text is None:
            continue
        out: list[LogLine] = []
        for raw in text.splitlines():
            line = _PREFIX.sub("", raw.strip())
            if not line:
                continue
            if m := _DRIVER_DEVICE.match(line):
                out.append(LogLine(rel, m.group(1), m.group(2), m.group(3)))
            else:
                out.append(LogLine(rel, None, None, line))
        return out
    return []


def drm_initialized(log: list[LogLine], device: str) -> tuple[str, str] | None:
    """(driver, version) from `[drm] Initialized <driver> <version> ... for <device>`."""
    for line in log:
        m = _INITIALIZED.search(line.message)
        if m and m.group(3) == device:
            return m.group(1), m.group(2)
    return None
