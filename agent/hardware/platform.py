"""Platform devices: SoC blocks off PCI, as sysfs shows them (GPUs and NPUs of Arm SoCs).

Read under the root:

- `sys/bus/platform/devices/<name>/`: `driver` (link, or a plain file naming it),
  `of_node/compatible` (NUL-separated) or `modalias` (`of:N<node>T<type>C<compat>C...`),
  and `power_policy` (an attribute only Arm's mali_kbase driver creates).
- `sys/class/devfreq/<name>/`: `governor`, `cur_freq`, `available_frequencies` (Hz).
  devfreq names its node after the device it scales, so `fb000000.gpu` is the platform
  device of the device-tree node `gpu@fb000000`.
- `sys/class/drm/card*/device`: the DRM card's parent device (link, or a plain file naming
  it); a parent that is not a PCI address is a platform device.
- loaded modules: `proc/modules`, and `sys/module/<name>` where it has `initstate` or
  `refcnt` (which only loadable modules have; built-in code with parameters appears in
  `sys/module` too, whether or not its hardware exists).

A platform device's name is `<unit address>.<node name>` for device-tree devices; the node
name follows the devicetree spec's generic names (`gpu`, `npu`), sometimes with a suffix
(`gpu-panthor`), which is how a GPU or NPU is recognised without a table of SoCs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.hardware.devroot import DeviceRoot
from agent.hardware.pci import normalize_pci_address

_PLATFORM = "sys/bus/platform/devices"
_DEVFREQ = "sys/class/devfreq"
_UNIT_NAME = re.compile(r"^(?:[0-9a-fA-F]+\.)?([A-Za-z][\w-]*)$")


def node_name(device: str) -> str | None:
    """`fb000000.gpu` → `gpu`, `fb000000.gpu-panthor` → `gpu-panthor`; None for `dmc:x`."""
    m = _UNIT_NAME.match(device)
    return m.group(1).lower() if m else None


def is_node(device: str, *generic: str) -> bool:
    """Whether the device's node name is one of `generic`, alone or with a `-suffix`."""
    name = node_name(device)
    return name is not None and any(name == g or name.startswith(f"{g}-") for g in generic)


@dataclass(frozen=True)
class PlatformDevice:
    """One `sys/bus/platform/devices` entry; attributes are None/empty when unreadable."""

    name: str
    sysfs: str
    driver: str | None
    compatible: tuple[str, ...]
    power_policy: str | None

    def describe(self) -> str:
        bits = [f"driver {self.driver}" if self.driver else "no driver bound"]
        if self.compatible:
            bits.append(f"compatible {', '.join(self.compatible)}")
        return f"{self.sysfs} ({'; '.join(bits)})"


def _compatible(root: DeviceRoot, base: str) -> tuple[str, ...]:
    data = root.read_bytes(f"{base}/of_node/compatible", 64 * 1024)
    if data is not None:
        parts = (p.decode("utf-8", "replace").strip() for p in data.split(b"\x00"))
        return tuple(p for p in parts if p and p.isprintable())
    alias = root.read_line(f"{base}/modalias") or ""
    if alias.startswith("of:"):
        return tuple(c for c in alias.split("C")[1:] if c and c.isprintable())
    return ()


def platform_device(root: DeviceRoot, name: str) -> PlatformDevice:
    base = f"{_PLATFORM}/{name}"
    return PlatformDevice(
        name=name, sysfs=base, driver=root.link_name(f"{base}/driver"),
        compatible=_compatible(root, base), power_policy=root.read_line(f"{base}/power_policy"),
    )


def platform_devices(root: DeviceRoot) -> list[PlatformDevice]:
    return [platform_device(root, n) for n in root.children(_PLATFORM)]


@dataclass(frozen=True)
class Devfreq:
    """One devfreq node: the device it scales, its governor and its frequencies (Hz)."""

    name: str
    governor: str | None
    cur_hz: int | None
    freqs_hz: tuple[int, ...]

    def describe(self) -> str:
        bits = [f"governor {self.governor}" if self.governor else "no governor"]
        if self.freqs_hz:
            lo, hi = min(self.freqs_hz) / 1e6, max(self.freqs_hz) / 1e6
            bits.append(f"{lo:g}–{hi:g} MHz")
        return f"{_DEVFREQ}/{self.name} ({', '.join(bits)})"


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(t) for t in (text or "").split() if t.isdigit())


def devfreq_nodes(root: DeviceRoot) -> list[Devfreq]:
    out: list[Devfreq] = []
    for name in root.children(_DEVFREQ):
        base = f"{_DEVFREQ}/{name}"
        cur = _ints(root.read_line(f"{base}/cur_freq"))
        out.append(Devfreq(
            name=name, governor=root.read_line(f"{base}/governor"),
            cur_hz=cur[0] if cur else None,
            freqs_hz=_ints(root.read_text(f"{base}/available_frequencies", 64 * 1024)),
        ))
    return out


def drm_card_parents(root: DeviceRoot) -> dict[str, str]:
    """DRM card → the name of its parent device, for cards whose parent is not on PCI."""
    out: dict[str, str] = {}
    for card in root.children("sys/class/drm"):
        if not re.fullmatch(r"card\d+", card):
            continue
        parent = root.link_name(f"sys/class/drm/{card}/device")
        if parent and normalize_pci_address(parent) is None:
            out[card] = parent
    return out


def loaded_modules(root: DeviceRoot) -> dict[str, str]:
    """Loaded kernel modules → where that was read (`proc/modules` or `sys/module/<m>`)."""
    out: dict[str, str] = {}
    for line in (root.read_text("proc/modules") or "").splitlines():
        if fields := line.split():
            out.setdefault(fields[0], "proc/modules")
    for name in root.children("sys/module"):
        for attr in ("initstate", "refcnt"):
            if root.exists(f"sys/module/{name}/{attr}"):
                out.setdefault(name, f"sys/module/{name}/{attr}")
                break
    return out
