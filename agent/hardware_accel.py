"""GPUs and NPUs: which accelerators a device root shows, and whether each is usable.

Read under the root (tree conventions are in `agent.hardware`):

- PCI: `sys/bus/pci/devices/<addr>/{vendor,device,class,driver}`; `driver` is a symlink
  on a real system or a plain file holding the driver's name in a fixture tree.
- NVIDIA: `proc/driver/nvidia/version`, `proc/driver/nvidia/gpus/<addr>/information`, and
  nvidia-smi: run (`nvidia-smi -q -x`) on the live system only, read from a capture in a
  tree (`NVIDIA_SMI_XML`, else the plain table in `NVIDIA_SMI_TEXT`).
- Jetson: a device-tree `compatible` of `nvidia,tegra*` means an integrated GPU.
- NPUs: Intel (`intel_vpu`) and AMD (`amdxdna`) on PCI with `dev/accel/accel*`;
  Qualcomm Hexagon via `sys/class/remoteproc/*/{name,state}` and `dev/fastrpc-*`;
  Rockchip via `sys/kernel/debug/rknpu/version`, a platform device bound to `RKNPU`,
  `dev/rknpu` or the SoC's compatible; Hailo via PCI vendor 0x1e60 and `dev/hailo*`.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from agent.devroot import DeviceRoot
from registry.profile import GpuInfo, GpuVendor, NpuInfo, NpuKind

CAPTURE_DIR = "var/lib/edge-agent/capture"
NVIDIA_SMI_XML = f"{CAPTURE_DIR}/nvidia-smi-q.xml"
NVIDIA_SMI_TEXT = f"{CAPTURE_DIR}/nvidia-smi.txt"
NVIDIA_SMI_TIMEOUT_S = 10.0

_NVIDIA = 0x10DE
_PCI_VENDOR_GPU: dict[int, GpuVendor] = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}
_DRIVER_GPU: dict[str, GpuVendor] = {
    "nvidia": "nvidia", "nouveau": "nvidia", "amdgpu": "amd", "radeon": "amd",
    "i915": "intel", "xe": "intel",
}
# BMC and paravirtual display adapters: a VGA port, not something to run a model on.
_DISPLAY_ONLY_VENDORS = {0x1A03, 0x102B, 0x15AD, 0x1B36, 0x1AF4, 0x1013, 0x1234, 0x1414}

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
_TEGRA_SOCS = {"nvidia,tegra264": "Thor", "nvidia,tegra234": "Orin",
               "nvidia,tegra194": "Xavier", "nvidia,tegra186": "TX2", "nvidia,tegra210": "TX1"}
_RKNPU_SOCS = ("rockchip,rk3588", "rockchip,rk3588s", "rockchip,rk3576", "rockchip,rk3568",
               "rockchip,rk3566", "rockchip,rk3562")

_PCI_ADDR = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_NVRM = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)")
_MIB = re.compile(r"^\s*(\d+)\s*MiB\b")
_SMI_ROW = re.compile(r"^(\d+)\s+(.+?)\s+(?:On|Off|N/A)$")
_SMI_MEM = re.compile(r"(\d+)MiB\s*/\s*(\d+)MiB")
_VERSION = re.compile(r"v?(\d+(?:\.\d+)+)")


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


# --- NVIDIA ------------------------------------------------------------------------


@dataclass(frozen=True)
class SmiGpu:
    bus: str | None
    name: str | None
    memory_bytes: int | None
    pci_id: str | None = None


@dataclass(frozen=True)
class SmiReport:
    """What nvidia-smi said: the driver, the CUDA version and one entry per GPU shown."""

    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[SmiGpu, ...]


def _parse_xml(text: str) -> ET.Element | None:
    try:
        defused = importlib.import_module("defusedxml.ElementTree")
    except ImportError:
        defused = None
    try:
        if defused is not None:
            parsed: ET.Element = defused.fromstring(text)
            return parsed
        # defusedxml is not a dependency. The input is the output of the local nvidia-smi
        # or a file the operator captured from it; expat (>= 2.4.1) refuses entity blow-ups
        # and never fetches the external DTD nvidia-smi names.
        return ET.fromstring(text)  # noqa: S314
    except Exception:  # ParseError, or defusedxml's refusals: malformed means absent
        return None


def _xml_text(el: ET.Element, path: str) -> str | None:
    found = el.find(path)
    value = (found.text or "").strip() if found is not None else ""
    return None if value in ("", "N/A") else value


def _mib(text: str | None) -> int | None:
    m = _MIB.match(text or "")
    return int(m.group(1)) * 1024 * 1024 if m else None


def parse_nvidia_smi_xml(text: str) -> SmiReport | None:
    """Parse `nvidia-smi -q -x`; None when it is not that document."""
    doc = _parse_xml(text)
    if doc is None or doc.tag != "nvidia_smi_log":
        return None
    gpus: list[SmiGpu] = []
    for g in doc.findall("gpu"):
        bus = normalize_pci_address(g.get("id") or _xml_text(g, "pci/pci_bus_id") or "")
        pci_id = None
        raw_id = _xml_text(g, "pci/pci_device_id") or ""
        if re.fullmatch(r"[0-9A-Fa-f]{8}", raw_id):  # DDDDVVVV: device, then vendor
            pci_id = f"{raw_id[4:]}:{raw_id[:4]}".lower()
        # Only the GPU's own fb_memory_usage; MIG instances carry their own below mig_devices.
        gpus.append(SmiGpu(bus, _xml_text(g, "product_name"),
                           _mib(_xml_text(g, "fb_memory_usage/total")), pci_id))
    return SmiReport(_xml_text(doc, "driver_version"), _xml_text(doc, "cuda_version"),
                     tuple(gpus))


def parse_nvidia_smi_table(text: str) -> SmiReport | None:
    """Parse the default `nvidia-smi` table; None when it has no header."""
    driver = re.search(r"Driver Version:\s*(\d[\w.]*)", text)
    cuda = re.search(r"CUDA Version:\s*(\d[\w.]*)", text)
    if driver is None and cuda is None:
        return None
    lines = text.splitlines()
    gpus: list[SmiGpu] = []
    for i, line in enumerate(lines):
        if "Processes:" in line:
            break
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 5 or (m := _SMI_ROW.match(cells[1])) is None:
            continue
        bus = normalize_pci_address(cells[2].split()[0]) if cells[2] else None
        memory = None
        if i + 1 < len(lines):
            below = lines[i + 1].split("|")
            if len(below) > 2 and (mm := _SMI_MEM.search(below[2])):
                memory = int(mm.group(2)) * 1024 * 1024
        gpus.append(SmiGpu(bus, m.group(2), memory))
    return SmiReport(driver.group(1) if driver else None, cuda.group(1) if cuda else None,
                     tuple(gpus))


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-q", "-x"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_smi_report(root: DeviceRoot) -> SmiReport | None:
    """Live: run nvidia-smi if installed. Tree: the captured XML, else the captured table."""
    if root.is_live:
        out = _run_nvidia_smi()
        return parse_nvidia_smi_xml(out) if out else None
    xml_text = root.read_text(NVIDIA_SMI_XML, limit=16 << 20)
    report = parse_nvidia_smi_xml(xml_text) if xml_text else None
    if report is None and (table := root.read_text(NVIDIA_SMI_TEXT)):
        report = parse_nvidia_smi_table(table)
    return report


def nvrm_version(text: str | None) -> str | None:
    """The driver version from `proc/driver/nvidia/version`'s NVRM line."""
    m = _NVRM.search(text or "")
    return m.group(1) if m else None


def _key_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


@dataclass
class _Nv:
    bus: str | None
    name: str | None = None
    memory_bytes: int | None = None
    driver: str | None = None
    pci_id: str | None = None


def _nvidia_gpus(root: DeviceRoot, pci: list[PciDevice]) -> list[GpuInfo]:
    found: dict[str, _Nv] = {}
    for dev in pci:
        by_driver = dev.pci_class is None and dev.driver in ("nvidia", "nouveau")
        if (dev.vendor == _NVIDIA and dev.is_display) or by_driver:
            found[dev.address] = _Nv(dev.address, driver=dev.driver, pci_id=dev.pci_id)
    for entry in root.children("proc/driver/nvidia/gpus"):
        info = _key_values(root.read_text(f"proc/driver/nvidia/gpus/{entry}/information") or "")
        bus = normalize_pci_address(info.get("Bus Location", "")) or normalize_pci_address(entry)
        if bus is None:
            continue
        nv = found.setdefault(bus, _Nv(bus))
        nv.name = info.get("Model") or nv.name
        nv.driver = nv.driver or "nvidia"  # the proc entry exists only under nvidia.ko
    smi = nvidia_smi_report(root)
    for i, g in enumerate(smi.gpus if smi else ()):
        nv = found.setdefault(g.bus or f"~{i}", _Nv(g.bus))
        nv.name = g.name or nv.name
        nv.memory_bytes = g.memory_bytes if g.memory_bytes is not None else nv.memory_bytes
        nv.pci_id = nv.pci_id or g.pci_id
        if nv.driver is None:
            nv.driver = "nvgpu" if "nvgpu" in (g.name or "").lower() else "nvidia"
    driver_version = nvrm_version(root.read_text("proc/driver/nvidia/version"))
    driver_version = driver_version or (smi.driver_version if smi else None)
    cuda = smi.cuda_version if smi else None
    return [
        GpuInfo(
            vendor="nvidia",
            name=nv.name or (f"NVIDIA GPU {nv.pci_id}" if nv.pci_id else "NVIDIA GPU"),
            # Discrete NVIDIA GPUs always sit on PCI; one without a bus is Tegra's.
            integrated=nv.bus is None,
            memory_bytes=nv.memory_bytes if nv.bus is not None else None,
            driver=nv.driver, driver_version=driver_version, compute_api_version=cuda,
            pci_id=nv.pci_id,
        )
        for _, nv in sorted(found.items())
    ]


def _tegra_gpu(root: DeviceRoot, compatible: tuple[str, ...]) -> GpuInfo | None:
    soc = next((c for c in compatible if c in _TEGRA_SOCS), None)
    if soc is None:
        return None
    return GpuInfo(
        vendor="nvidia", name=f"{_TEGRA_SOCS[soc]} integrated GPU ({soc.split(',', 1)[1]})",
        integrated=True, driver="nvgpu" if root.exists("sys/module/nvgpu") else None,
        driver_version=nvrm_version(root.read_text("proc/driver/nvidia/version")),
    )


def _other_gpus(root: DeviceRoot, pci: list[PciDevice]) -> list[GpuInfo]:
    out: list[GpuInfo] = []
    for dev in pci:
        by_driver = _DRIVER_GPU.get(dev.driver or "")
        if not (dev.is_display or (dev.pci_class is None and by_driver is not None)):
            continue
        if dev.vendor == _NVIDIA or by_driver == "nvidia" or dev.vendor in _DISPLAY_ONLY_VENDORS:
            continue
        vendor: GpuVendor = by_driver or "other"
        if dev.vendor is not None:
            vendor = _PCI_VENDOR_GPU.get(dev.vendor, "other")
        label = {"amd": "AMD", "intel": "Intel", "nvidia": "NVIDIA"}.get(vendor, "Unknown")
        name = root.read_line(f"{dev.sysfs}/product_name") or " ".join(
            filter(None, [label, "GPU", dev.pci_id]))
        memory = None
        if vendor == "amd":
            vram = root.read_line(f"{dev.sysfs}/mem_info_vram_total") or ""
            memory = int(vram) if vram.isdigit() else None
        out.append(GpuInfo(
            vendor=vendor, name=name,
            # Intel puts its iGPU on the root bus; its discrete Arc cards sit behind bridges.
            integrated=vendor == "intel" and dev.address.startswith("0000:00:"),
            memory_bytes=memory, driver=dev.driver, pci_id=dev.pci_id,
        ))
    return out


def detect_gpus(root: DeviceRoot, compatible: tuple[str, ...],
                pci: list[PciDevice]) -> tuple[GpuInfo, ...]:
    gpus = _nvidia_gpus(root, pci)
    if not any(g.integrated for g in gpus) and (tegra := _tegra_gpu(root, compatible)):
        gpus.append(tegra)
    return tuple(gpus + _other_gpus(root, pci))


# --- NPUs --------------------------------------------------------------------------


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
    accel = _AccelNodes(sorted(n for n in root.children("dev/accel") if n.startswith("accel")))
    npus = _pci_npus(root, pci, accel)
    npus += _module_npus(root, {n.kind for n in npus}, accel)
    npus += _hexagon(root)
    if (rk := _rknpu(root, compatible)) is not None:
        npus.append(rk)
    return tuple(npus)
