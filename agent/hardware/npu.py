"""NPUs: which neural accelerators a device root shows, how sure that is, and their state.

Read under the root:

- Intel (`intel_vpu`) and AMD (`amdxdna`) on PCI (`agent.hardware.pci`) with
  `dev/accel/accel*`; either one also from its loaded module and an accel node alone.
- Qualcomm Hexagon via `sys/class/remoteproc/*/{name,state}` and `dev/fastrpc-*`.
- Rockchip via `sys/kernel/debug/rknpu/version`, a platform device bound to `RKNPU`,
  `dev/rknpu`, its devfreq node (`fdab0000.npu`, governor `rknpu_ondemand`), the kernel
  log, or the SoC's compatible.
- Any other NPU whose devfreq node is named `<addr>.npu` (kind "other", never selected).
- Hailo via PCI vendor 0x1e60 and `dev/hailo*`.

State (docs/hardware.md): "online" when the driver is bound and a device node reaches it;
"offline" when the device is there but its driver is not (or it is bound and has no node,
or a DSP is not running); "unknown" when only indirect signs show it — a devfreq node or
driver messages — so nothing says whether it is usable now. Only "online" NPUs are offered
to selection (`NpuInfo.online`).

The generation comes from the PCI device ID where there is one, else from the firmware
the driver loaded (a kernel-log line naming `intel/vpu/vpu_37xx_v0.0.bin` or
`amdnpu/17f0_10/`), else from the firmware installed under `lib/firmware` when it holds
files for one generation only (a weak hint: linux-firmware ships them all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.hardware.devroot import DeviceRoot
from agent.hardware.kernlog import LogLine, drm_initialized, kernel_log
from agent.hardware.pci import PciDevice, normalize_pci_address
from agent.hardware.platform import Devfreq, devfreq_nodes, is_node, platform_devices
from registry.profile import Confidence, NpuInfo, NpuKind, NpuState

# PCI device → (platform, NPU IP generation as the kernel's ivpu driver names it).
_INTEL_NPU_IDS = {0x7D1D: ("Meteor Lake", "37xx"), 0xAD1D: ("Arrow Lake", "37xx"),
                  0x643E: ("Lunar Lake", "40xx"), 0xB03E: ("Panther Lake", "50xx")}
_INTEL_GEN_PLATFORMS = {"37xx": "Meteor Lake / Arrow Lake", "40xx": "Lunar Lake",
                        "50xx": "Panther Lake"}
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
# The firmware file names carry the generation: ivpu loads intel/vpu/vpu_<gen>_v*.bin,
# amdxdna loads amdnpu/<PCI device>_<revision>/npu.sbin.
_INTEL_FW = re.compile(r"\bintel/vpu/vpu_(\d\d)xx[\w.]*?\.bin\b")
_XDNA_FW = re.compile(r"\bamdnpu/([0-9a-fA-F]{4})_([0-9a-fA-F]{2})\b")
# linux-firmware's places, and `updates/` where Intel's intel-fw-npu package installs.
_FIRMWARE_DIRS = ("lib/firmware/updates", "lib/firmware", "usr/lib/firmware/updates",
                  "usr/lib/firmware")

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


@dataclass(frozen=True)
class _Generation:
    value: str
    evidence: str
    weak: bool  # only the installed firmware said so


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


def _fw_generation(kind: NpuKind, text: str) -> str | None:
    if kind == "intel-npu" and (m := _INTEL_FW.search(text)):
        return f"{m.group(1)}xx"
    if kind == "amd-xdna" and (m := _XDNA_FW.search(text)):
        return _XDNA_IDS.get(int(m.group(1), 16))
    return None


def _generation(root: DeviceRoot, kind: NpuKind, dev: PciDevice | None,
                log: list[LogLine], driver: str) -> _Generation | None:
    """The NPU's generation: PCI ID, then loaded firmware, then installed firmware."""
    if dev is not None and dev.device is not None:
        if kind == "intel-npu" and dev.device in _INTEL_NPU_IDS:
            return _Generation(_INTEL_NPU_IDS[dev.device][1], f"PCI ID {dev.pci_id}", False)
        if kind == "amd-xdna" and dev.device in _XDNA_IDS:
            return _Generation(_XDNA_IDS[dev.device], f"PCI ID {dev.pci_id}", False)
    for line in log:
        if dev is not None:
            mine = normalize_pci_address(line.device or "") == dev.address
        else:
            mine = line.driver == driver
        if not mine or "fail" in line.message.lower():
            continue  # a firmware the driver failed to load says nothing
        if gen := _fw_generation(kind, line.message):
            said = f"{line.driver} {line.device}: {line.message}"
            return _Generation(gen, f"{line.source}: {said[:160]}", False)
    found: dict[str, str] = {}
    for base in _FIRMWARE_DIRS:
        sub = f"{base}/intel/vpu" if kind == "intel-npu" else f"{base}/amdnpu"
        for name in root.children(sub):
            if gen := _fw_generation(kind, f"intel/vpu/{name}" if kind == "intel-npu"
                                     else f"amdnpu/{name}"):
                found.setdefault(gen, sub)
    if len(found) == 1:
        ((gen, sub),) = found.items()
        return _Generation(gen, f"{sub} holds firmware for {gen} only", True)
    return None


def _npu_name(kind: NpuKind, dev: PciDevice | None, gen: _Generation | None) -> str:
    device = dev.device if dev is not None else None
    if kind == "intel-npu":
        if device in _INTEL_NPU_IDS:
            return f"Intel NPU ({_INTEL_NPU_IDS[device or -1][0]})"
        if gen is not None:
            platforms = _INTEL_GEN_PLATFORMS.get(gen.value)
            return f"Intel NPU {gen.value}" + (f" ({platforms})" if platforms else "")
        return "Intel NPU"
    if kind == "amd-xdna":
        return f"AMD Ryzen AI NPU ({gen.value if gen else 'XDNA'})"
    return "Hailo accelerator"


def _pci_npus(root: DeviceRoot, pci: list[PciDevice], accel: _AccelNodes,
              log: list[LogLine]) -> list[NpuInfo]:
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
            online, detail = False, "driver bound but no device node found"
        evidence = [dev.describe()]
        if node:
            evidence.append(f"{node.lstrip('/')} exists")
        gen = None
        if kind != "hailo":
            gen = _generation(root, kind, dev, log, next(iter(wanted)))
            if gen is not None:
                evidence.append(f"generation {gen.value}: {gen.evidence}")
        out.append(NpuInfo(
            kind=kind, name=_npu_name(kind, dev, gen), driver=dev.driver, device_node=node,
            online=online, detail=detail, generation=gen.value if gen else None,
            pci_address=dev.address, evidence=tuple(evidence),
            confidence="high" if dev.driver in wanted else "medium",
        ))
    if hailo_nodes and not any(n.kind == "hailo" for n in out):
        drv = "hailo_pci" if root.exists("sys/module/hailo_pci") else None
        out.append(NpuInfo(kind="hailo", name=_npu_name("hailo", None, None), driver=drv,
                           device_node=f"/dev/{hailo_nodes[0]}", confidence="medium",
                           evidence=(f"dev/{hailo_nodes[0]} exists (no PCI details)",)))
    return out


def _module_npus(root: DeviceRoot, seen: set[NpuKind], accel: _AccelNodes,
                 log: list[LogLine]) -> list[NpuInfo]:
    """An NPU known only from its loaded module and an accel node (PCI not readable)."""
    out: list[NpuInfo] = []
    pairs: tuple[tuple[NpuKind, str], ...] = (("intel-npu", "intel_vpu"), ("amd-xdna", "amdxdna"))
    for kind, module in pairs:
        if kind in seen or not root.exists(f"sys/module/{module}") or not accel.free:
            continue
        node = accel.take()
        gen = _generation(root, kind, None, log, module)
        evidence = [f"sys/module/{module} exists", f"{(node or '').lstrip('/')} exists"]
        if gen is not None:
            evidence.append(f"generation {gen.value}: {gen.evidence}")
        out.append(NpuInfo(kind=kind, name=_npu_name(kind, None, gen), driver=module,
                           device_node=node, generation=gen.value if gen else None,
                           detail="seen via its module and /dev/accel; no PCI details",
                           evidence=tuple(evidence), confidence="low"))
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
        evidence = [f"sys/class/remoteproc/{rproc}: name {name}, state {state or 'unreadable'}"]
        if node:
            evidence.append(f"dev/{node} exists")
        out.append(NpuInfo(kind="qualcomm-hexagon", name=f"Qualcomm Hexagon DSP ({name})",
                           driver="fastrpc" if node else None,
                           device_node=f"/dev/{node}" if node else None,
                           online=online, detail=detail, evidence=tuple(evidence),
                           confidence="high" if online else "medium"))
    if not out and (cdsp := [n for n in fastrpc if "cdsp" in n]):
        out.append(NpuInfo(kind="qualcomm-hexagon", name="Qualcomm Hexagon DSP (cdsp)",
                           driver="fastrpc", device_node=f"/dev/{cdsp[0]}", confidence="medium",
                           evidence=(f"dev/{cdsp[0]} exists (no remoteproc entry)",)))
    return out


def _is_rknpu_devfreq(node: Devfreq, rockchip: bool) -> bool:
    governor = (node.governor or "").lower()
    return governor.startswith("rknpu") or (rockchip and is_node(node.name, "npu"))


def _rknpu(root: DeviceRoot, compatible: tuple[str, ...], log: list[LogLine],
           devfreq: list[Devfreq]) -> NpuInfo | None:
    evidence: list[str] = []
    version = None
    if (text := root.read_text("sys/kernel/debug/rknpu/version")) and (
            m := _VERSION.search(text.partition(":")[2] or text)):
        version = m.group(1)
        evidence.append(f"sys/kernel/debug/rknpu/version: {text.strip()}")
    bound, node, device = False, None, None
    for dev in platform_devices(root):
        if (dev.driver or "").lower() == "rknpu":
            bound, device = True, dev.name
            cards = [c for c in root.children(f"{dev.sysfs}/drm") if c.startswith("card")]
            node = f"/dev/dri/{cards[0]}" if cards else None
            evidence.append(dev.describe())
            break
    if root.exists("dev/rknpu"):
        node = node or "/dev/rknpu"
    if node:
        evidence.append(f"{node.lstrip('/')} exists")
    soc = next((c for c in compatible if c in _RKNPU_SOCS), None)
    rockchip = soc is not None or any(c.startswith("rockchip,") for c in compatible)
    freq = next((n for n in devfreq if _is_rknpu_devfreq(n, rockchip)), None)
    if freq is not None:
        device = device or freq.name
        evidence.append(freq.describe())
    said = [ln for ln in log if (ln.driver or "").lower() == "rknpu"]
    init = drm_initialized(log, device) if device else None
    if init is None and said and said[0].device:
        device = device or said[0].device
        init = drm_initialized(log, device)
    online = bound or version is not None or node is not None
    if init is not None and init[0] == "rknpu":
        version = version or init[1]
        said = said or [ln for ln in log if init[1] in ln.message]
        evidence.append(f"{log[0].source}: [drm] Initialized rknpu {init[1]} for {device}")
    elif said:
        evidence.append(f"{said[0].source}: RKNPU {said[0].device}: {said[0].message[:100]}")
    if soc is not None:
        evidence.append(f"compatible {soc}")
    if not online and soc is None and freq is None and not said:
        return None
    name = f"Rockchip {soc.split(',', 1)[1].upper()} NPU" if soc else "Rockchip NPU"
    state: NpuState = "online"
    confidence: Confidence = "high"
    detail = f"driver v{version}" if version else None
    if not online and (freq is not None or said):
        state, confidence = "unknown", "medium" if freq is not None else "low"
        seen = " and ".join(
            ([f"its devfreq node {freq.name}"] if freq is not None else [])
            + (["driver messages in the kernel log"] if said else []))
        detail = f"state unknown: seen only through {seen}; no driver binding or device node"
    elif not online:
        state, confidence = "offline", "medium"
        detail = "the SoC has an NPU but no rknpu driver is bound"
    return NpuInfo(kind="rockchip-rknpu", name=name,
                   driver="rknpu" if online or said else None, device_node=node,
                   state=state, detail=detail, evidence=tuple(evidence), confidence=confidence)


def _other_devfreq_npus(devfreq: list[Devfreq], taken: set[str]) -> list[NpuInfo]:
    """NPUs of kinds the agent has no runtime for, known by their `<addr>.npu` devfreq node."""
    return [
        NpuInfo(kind="other", name=f"NPU ({n.name})", state="unknown", confidence="low",
                detail="state unknown: seen only through its devfreq node; no runtime for it",
                evidence=(n.describe(),))
        for n in devfreq if is_node(n.name, "npu") and n.name not in taken
    ]


def detect_npus(root: DeviceRoot, compatible: tuple[str, ...],
                pci: list[PciDevice]) -> tuple[NpuInfo, ...]:
    """Every NPU the root shows: on PCI, by module alone, Hexagon DSPs, Rockchip's, others."""
    accel = _AccelNodes(sorted(n for n in root.children("dev/accel") if n.startswith("accel")))
    log = kernel_log(root)
    devfreq = devfreq_nodes(root)
    npus = _pci_npus(root, pci, accel, log)
    npus += _module_npus(root, {n.kind for n in npus}, accel, log)
    npus += _hexagon(root)
    taken: set[str] = set()
    if (rk := _rknpu(root, compatible, log, devfreq)) is not None:
        npus.append(rk)
        rockchip = any(c.startswith("rockchip,") for c in compatible)
        taken = {n.name for n in devfreq if _is_rknpu_devfreq(n, rockchip)}
    npus += _other_devfreq_npus(devfreq, taken)
    return tuple(npus)
