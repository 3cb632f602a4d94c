"""PCI devices: what `sys/bus/pci/devices` lists under a device root, and PCI addresses.

Each `sys/bus/pci/devices/<addr>/` gives `{vendor,device,class}` as sysfs hex and a
`driver` that is a symlink on a real system or a plain file holding the driver's name in
a fixture tree. GPU and NPU detection both read this one list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.hardware.devroot import DeviceRoot

_PCI_ADDR = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_pci_address(text: str) -> str | None:
    """`00000000:4A:00.0`, `4a:00.0` or `0000:4a:00.0` → `0000:4a:00.0`; None if not one."""
    m = _PCI_ADDR.match(text.strip())
    if m is None:
        return None
    domain = int(m.group(1), 16) if m.group(1) else 0
    if domain > 0xFFFF:
        return None
    return f"{domain:04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()


@dataclass(frozen=True)
class PciDevice:
    """One `sys/bus/pci/devices` entry; any attribute may be missing in a partial tree."""

    address: str
    sysfs: str
    vendor: int | None
    device: int | None
    pci_class: int | None
    driver: str | None

    @property
    def pci_id(self) -> str | None:
        if self.vendor is None or self.device is None:
            return None
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def is_display(self) -> bool:
        return self.pci_class is not None and self.pci_class >> 16 == 0x03

    def describe(self) -> str:
        """Where it was read and what it said, as evidence: `sys/bus/pci/devices/<addr>
        (1002:15bf class 030000; driver amdgpu)`."""
        ids = self.pci_id or (f"vendor {self.vendor:04x}" if self.vendor is not None else None)
        cls = f"class {self.pci_class:06x}" if self.pci_class is not None else None
        what = " ".join(filter(None, [ids, cls])) or "no IDs captured"
        drv = f"driver {self.driver}" if self.driver else "no driver bound"
        return f"{self.sysfs} ({what}; {drv})"


def pci_devices(root: DeviceRoot) -> list[PciDevice]:
    base = "sys/bus/pci/devices"
    out: list[PciDevice] = []
    for name in root.children(base):
        address = normalize_pci_address(name)
        if address is None:
            continue
        d = f"{base}/{name}"
        out.append(PciDevice(
            address=address, sysfs=d, vendor=root.read_hex(f"{d}/vendor"),
            device=root.read_hex(f"{d}/device"), pci_class=root.read_hex(f"{d}/class"),
            driver=root.link_name(f"{d}/driver"),
        ))
    return out
