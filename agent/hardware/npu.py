"""NPUs: which neural accelerators a device root shows, and whether each is usable.

Read under the root:

- Intel (`intel_vpu`) and AMD (`amdxdna`) on PCI (`agent.hardware.pci`) with
  `dev/accel/accel*`; either one also from its loaded module and an accel node alone.
- Qualcomm Hexagon via `sys/class/remoteproc/*/{name,state}` and `dev/fastrpc-*`.
- Rockchip via `sys/kernel/debug/rknpu/version`, a platform device bound to `RKNPU`,
  `dev/rknpu` or the SoC's compatible.
- Hailo via PCI vendor 0x1e60 and `dev/hailo*`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.hardware.devroot import DeviceRoot
from agent.hardware.pci import PciDevice, normalize_pci_address
from registry.profile import NpuInfo, NpuKind

_INTEL_NPU_IDS = {0x7D1D: "Meteor Lake", 0xAD1D: "Arrow Lake", 0x643E: "Lunar Lake",
                  0xB03E: "Panther Lake"}
_XDNA_IDS = {0x1502: "XDNA", 0x17F0: "XDNA 2", 0x17F1: "XDNA 2", 0x17F2: "XDNA 2",
             0x17F3: "XDNA 2", 0x1B0A: "XDNA 2", 0x1B0B: "XDNA 2", 0x1B0C: "XDNA 2"}
_HAILO_VENDOR = 0x1E60
_NPU_DRIVERS: dict[NpuKind, frozenset[str]] = {
    "intel-npu": frozenset({"intel_vpu"}),
    "amd-xdna": frozenset({"amdxdna"}),
    "hailo": frozenset({"hailo", "hailo_pci"}),
}
_RKNPU_SOCS = ("rockchip,rk3588", "rockchip,rk3588s", "rockchip,rk3576", "rockchip,rk3568",
               "rockchip,rk3566", "rockchip,rk3562")

_VERSION = re.compile(r"v?(\d+(?:\.\d+)+)")


@dataclass
class _AccelNodes:
    """dev/accel/accel* nodes, handed out once each to the NPUs that need one."""

    free: list[str] = field(default_factory=list)

    def take(self, name: str | None = None) -> str | None:
        if name is not None:
            if name in self.free:
                self.free.remove(name)
            return f"/dev/accel/{name}"
        return f"/dev/accel/{self.free.pop(0)}" if self.free else None


def _pci_npu_kind(dev: PciDevice) -> NpuKind | None:
    if dev.driver == "intel_vpu" or (dev.vendor == 0x8086 and dev.device in _INTEL_NPU_IDS):
        return "intel-npu"
    if dev.driver == "amdxdna" or (dev.vendor == 0x1022 and dev.device in _XDNA_IDS):
        return "amd-xdna"
    if dev.driver in _NPU_DRIVERS["hailo"] or dev.vendor == _HAILO_VENDOR:
        return "hailo"
    return None


def _accel_of(root: DeviceRoot, dev: PciDevice) -> str | None:
    own = [n for n in root.children(f"{dev.sysfs}/accel") if n.startswith("accel")]
    if own:
        return own[0]
    for n in root.children("sys/class/accel"):
        target = root.link_name(f"sys/class/accel/{n}/device")
        if target is not None and normalize_pci_address(target) == dev.address:
            return n
    return None


def _npu_name(kind: NpuKind, dev: PciDevice | None) -> str:
    device = dev.device if dev is not None else None
    if kind == "intel-npu":
        gen = _INTEL_NPU_IDS.get(device or -1)
        return f"Intel NPU ({gen})" if gen else "Intel NPU"
    if kind == "amd-xdna":
        return f"AMD Ryzen AI NPU ({_XDNA_IDS.get(device or -1, 'XDNA')})"
    return "Hailo accelerator"


def _pci_npus(root: DeviceRoot, pci: list[PciDevice], accel: _AccelNodes) -> list[NpuInfo]:
    out: list[NpuInfo] = []
    hailo_nodes = [n for n in root.children("dev") if re.fullmatch(r"hailo\d+", n)]
    for dev in pci:
        kind = _pci_npu_kind(dev)
        if kind is None:
            continue
        wanted = _NPU_DRIVERS[kind]
        online = dev.driver in wanted
        detail = None
        if not online:
            detail = (f"bound to {dev.driver}, not {'/'.join(sorted(wanted))}" if dev.driver
                      else f"no driver bound ({'/'.join(sorted(wanted))} not loaded?)")
        node = None
        if kind == "hailo":
            node = f"/dev/{hailo_nodes.pop(0)}" if hailo_nodes and online else None
        elif (own := _accel_of(root, dev)) is not None:
            node = accel.take(own)
        elif online:
            node = accel.take()
        if online and node is None:
            detail = "driver bound but no device node found"
        out.append(NpuInfo(kind=kind, name=_npu_name(kind, dev), driver=dev.driver,
                           device_node=node, online=online, detail=detail))
    if hailo_nodes and not any(n.kind == "hailo" for n in out):
        drv = "hailo_pci" if root.exists("sys/module/hailo_pci") else None
        out.append(NpuInfo(kind="hailo", name=_npu_name("hailo", None), driver=drv,
                           device_node=f"/dev/{hailo_nodes[0]}"))
    return out


def _module_npus(root: DeviceRoot, seen: set[NpuKind], accel: _AccelNodes) -> list[NpuInfo]:
    """An NPU known only from its loaded module and an accel node (PCI not readable)."""
    out: list[NpuInfo] = []
    pairs: tuple[tuple[NpuKind, str], ...] = (("intel-npu", "intel_vpu"), ("amd-xdna", "amdxdna"))
    for kind, module in pairs:
        if kind in seen or not root.exists(f"sys/module/{module}") or not accel.free:
            continue
        out.append(NpuInfo(kind=kind, name=_npu_name(kind, None), driver=module,
                           device_node=accel.take(),
                           detail="seen via its module and /dev/accel; no PCI details"))
    return out


def _hexagon(root: DeviceRoot) -> list[NpuInfo]:
    fastrpc = sorted(n for n in root.children("dev") if n.startswith("fastrpc-"))
    out: list[NpuInfo] = []
    for rproc in root.children("sys/class/remoteproc"):
        name = root.read_line(f"sys/class/remoteproc/{rproc}/name") or ""
        if "cdsp" not in name.lower() and not name.lower().startswith("nsp"):
            continue
        domain = re.sub(r"^.*?(cdsp\d*|nsp\d*).*$", r"\1", name.lower())
        wanted = {f"fastrpc-{domain}"} | ({"fastrpc-cdsp"} if domain == "cdsp0" else set())
        node = next((n for n in fastrpc if n in wanted), None)
        state = root.read_line(f"sys/class/remoteproc/{rproc}/state")
        online, detail = False, None
        if state is not None and state != "running":
            detail = f"{rproc} ({name}) state is {state}"
        elif node is None:
            detail = f"{rproc} ({name}) has no /dev/fastrpc-{domain} node"
        else:
            online = True
        out.append(NpuInfo(kind="qualcomm-hexagon", name=f"Qualcomm Hexagon DSP ({name})",
                           driver="fastrpc" if node else None,
                           device_node=f"/dev/{node}" if node else None,
                           online=online, detail=detail))
    if not out and (cdsp := [n for n in fastrpc if "cdsp" in n]):
        out.append(NpuInfo(kind="qualcomm-hexagon", name="Qualcomm Hexagon DSP (cdsp)",
                           driver="fastrpc", device_node=f"/dev/{cdsp[0]}"))
    return out


def _rknpu(root: DeviceRoot, compatible: tuple[str, ...]) -> NpuInfo | None:
    version = None
    if (text := root.read_text("sys/kernel/debug/rknpu/version")) and (
            m := _VERSION.search(text.partition(":")[2] or text)):
        version = m.group(1)
    bound, node = False, None
    for dev in root.children("sys/bus/platform/devices"):
        base = f"sys/bus/platform/devices/{dev}"
        if (root.link_name(f"{base}/driver") or "").lower() == "rknpu":
            bound = True
            cards = [c for c in root.children(f"{base}/drm") if c.startswith("card")]
            node = f"/dev/dri/{cards[0]}" if cards else None
            break
    if root.exists("dev/rknpu"):
        node = node or "/dev/rknpu"
    soc = next((c for c in compatible if c in _RKNPU_SOCS), None)
    online = bound or version is not None or node is not None
    if not online and soc is None:
        return None
    name = f"Rockchip {soc.split(',', 1)[1].upper()} NPU" if soc else "Rockchip NPU"
    detail = f"driver v{version}" if version else None
    if not online:
        detail = "the SoC has an NPU but no rknpu driver is bound"
    return NpuInfo(kind="rockchip-rknpu", name=name, driver="rknpu" if online else None,
                   device_node=node, online=online, detail=detail)


def detect_npus(root: DeviceRoot, compatible: tuple[str, ...],
                pci: list[PciDevice]) -> tuple[NpuInfo, ...]:
    """Every NPU the root shows: on PCI, by module alone, Hexagon DSPs, then Rockchip's."""
    accel = _AccelNodes(sorted(n for n in root.children("dev/accel") if n.startswith("accel")))
    npus = _pci_npus(root, pci, accel)
    npus += _module_npus(root, {n.kind for n in npus}, accel)
    npus += _hexagon(root)
    if (rk := _rknpu(root, compatible)) is not None:
        npus.append(rk)
    return tuple(npus)
