"""GPUs: which ones a device root shows (PCI, Jetson, SoC GPUs off PCI) and how sure that is.

Read under the root:

- PCI display devices (`agent.hardware.pci`); BMC and paravirtual display adapters are
  skipped, since a VGA port is not something to run a model on.
- NVIDIA: `proc/driver/nvidia/version`, `proc/driver/nvidia/gpus/<addr>/information`
  and nvidia-smi (`agent.hardware.nvidia_smi`), merged per PCI address.
- Jetson: a device-tree `compatible` of `nvidia,tegra*` means an integrated GPU.
- AMD: `mem_info_{vram,vis_vram,gtt}_total`, `mem_info_vram_vendor`, `pcie_bw` and
  `product_name` beside the PCI device; whether it is an APU's iGPU is a class rule
  (`_amd_integrated`, docs/hardware.md).
- Intel: an Intel GPU on the root bus 00 is the iGPU; Arc cards sit behind bridges.
- SoC GPUs off PCI (`agent.hardware.platform`): a platform device bound to a GPU driver
  (panfrost, panthor, mali, lima, msm/adreno, v3d, etnaviv, powervr) or whose device-tree
  `compatible` names a GPU (`arm,mali-*`, `qcom,adreno*`, ...), a DRM card whose parent is
  not on PCI, a devfreq node named `<addr>.gpu`, or, failing all of those, a loaded GPU
  driver module. They share system RAM: `integrated` is true (not for a PCI GPU driver's
  module seen where no PCI list was readable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.hardware.devroot import DeviceRoot
from agent.hardware.nvidia_smi import nvidia_smi_report
from agent.hardware.pci import PciDevice, normalize_pci_address
from agent.hardware.platform import (
    PlatformDevice,
    devfreq_nodes,
    drm_card_parents,
    is_node,
    loaded_modules,
    platform_device,
    platform_devices,
)
from registry.profile import Confidence, GpuInfo, GpuVendor

_NVIDIA = 0x10DE
_AMD_GPU, _AMD_SOC = 0x1002, 0x1022  # ATI's vendor ID (GPUs), AMD's own (CPU/SoC functions)
_PCI_VENDOR_GPU: dict[int, GpuVendor] = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}
_DRIVER_GPU: dict[str, GpuVendor] = {
    "nvidia": "nvidia", "nouveau": "nvidia", "amdgpu": "amd", "radeon": "amd",
    "i915": "intel", "xe": "intel",
}
# Kernel drivers of GPUs that live on an SoC, off PCI. NVIDIA's (nvgpu, gk20a) are Jetson's,
# which the Tegra rule reports.
_SOC_GPU_DRIVERS: dict[str, GpuVendor] = {
    "panfrost": "arm", "panthor": "arm", "mali": "arm", "mali_kbase": "arm", "lima": "arm",
    "msm": "qualcomm", "adreno": "qualcomm", "v3d": "other", "etnaviv": "other",
    "powervr": "other", "pvrsrvkm": "other", "nvgpu": "nvidia", "gk20a": "nvidia",
}
# Device-tree compatible prefixes of GPU nodes → vendor.
_GPU_COMPATIBLE: tuple[tuple[str, GpuVendor], ...] = (
    ("arm,mali", "arm"), ("qcom,adreno", "qualcomm"), ("brcm,2711-v3d", "other"),
    ("brcm,2712-v3d", "other"), ("brcm,bcm2835-v3d", "other"), ("vivante,gc", "other"),
    ("img,img-", "other"), ("img,powervr", "other"), ("nvidia,gk20a", "nvidia"),
    ("nvidia,gp10b", "nvidia"), ("nvidia,gv11b", "nvidia"), ("nvidia,ga10b", "nvidia"),
)
# A vendor's SoCs whose GPU is always that vendor's own design: Qualcomm's is Adreno.
_SOC_VENDOR_GPU: dict[str, GpuVendor] = {"qcom": "qualcomm", "nvidia": "nvidia"}
_VENDOR_LABEL: dict[GpuVendor, str] = {
    "nvidia": "NVIDIA GPU", "amd": "AMD GPU", "intel": "Intel GPU", "arm": "Arm Mali GPU",
    "qualcomm": "Qualcomm Adreno GPU", "other": "GPU",
}
_DRIVER_LABEL = {"v3d": "Broadcom V3D GPU", "etnaviv": "Vivante GPU",
                 "powervr": "Imagination PowerVR GPU", "pvrsrvkm": "Imagination PowerVR GPU"}
# BMC and paravirtual display adapters: a VGA port, not something to run a model on.
_DISPLAY_ONLY_VENDORS = {0x1A03, 0x102B, 0x15AD, 0x1B36, 0x1AF4, 0x1013, 0x1234, 0x1414}
_TEGRA_SOCS = {"nvidia,tegra264": "Thor", "nvidia,tegra234": "Orin",
               "nvidia,tegra194": "Xavier", "nvidia,tegra186": "TX2", "nvidia,tegra210": "TX1"}

_NVRM = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)")
_CPU_NAMES_RADEON = re.compile(r"\bRadeon\b", re.IGNORECASE)
_RADEON_NAME = re.compile(r"\bRadeon\b[^,()/]*", re.IGNORECASE)
# An iGPU's "VRAM" is the firmware's carve-out of system RAM, and the kernel offers far more
# through GTT; a discrete card's GTT is about half of RAM, so four times its VRAM or more is
# only reached by small cards in big machines — which the discrete signs below catch.
_CARVE_OUT_GTT_FACTOR = 4


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


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class _Nv:
    bus: str | None
    name: str | None = None
    memory_bytes: int | None = None
    driver: str | None = None
    pci_id: str | None = None
    evidence: list[str] = field(default_factory=list)


def _nvidia_gpus(root: DeviceRoot, pci: list[PciDevice]) -> list[GpuInfo]:
    found: dict[str, _Nv] = {}
    for dev in pci:
        by_driver = dev.pci_class is None and dev.driver in ("nvidia", "nouveau")
        if (dev.vendor == _NVIDIA and dev.is_display) or by_driver:
            nv = found[dev.address] = _Nv(dev.address, driver=dev.driver, pci_id=dev.pci_id)
            nv.evidence.append(dev.describe())
    for entry in root.children("proc/driver/nvidia/gpus"):
        rel = f"proc/driver/nvidia/gpus/{entry}/information"
        info = _key_values(root.read_text(rel) or "")
        bus = normalize_pci_address(info.get("Bus Location", "")) or normalize_pci_address(entry)
        if bus is None:
            continue
        nv = found.setdefault(bus, _Nv(bus))
        nv.name = info.get("Model") or nv.name
        nv.driver = nv.driver or "nvidia"  # the proc entry exists only under nvidia.ko
        nv.evidence.append(f"{rel} (nvidia.ko's own entry)")
    smi = nvidia_smi_report(root)
    for i, g in enumerate(smi.gpus if smi else ()):
        nv = found.setdefault(g.bus or f"~{i}", _Nv(g.bus))
        nv.name = g.name or nv.name
        nv.memory_bytes = g.memory_bytes if g.memory_bytes is not None else nv.memory_bytes
        nv.pci_id = nv.pci_id or g.pci_id
        if nv.driver is None:
            nv.driver = "nvgpu" if "nvgpu" in (g.name or "").lower() else "nvidia"
        said = "nvidia-smi" if root.is_live else "captured nvidia-smi output"
        nv.evidence.append(f"{said} lists GPU {i}" + (f" at {g.bus}" if g.bus else ""))
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
            pci_id=nv.pci_id, pci_address=nv.bus, evidence=tuple(nv.evidence),
            confidence="high" if nv.driver else "medium",
        )
        for _, nv in sorted(found.items())
    ]


def _tegra_gpu(root: DeviceRoot, compatible: tuple[str, ...]) -> GpuInfo | None:
    soc = next((c for c in compatible if c in _TEGRA_SOCS), None)
    if soc is None:
        return None
    driver = "nvgpu" if root.exists("sys/module/nvgpu") else None
    evidence = [f"proc/device-tree/compatible: {soc} (a Tegra SoC: its GPU is on the die)"]
    if driver:
        evidence.append("sys/module/nvgpu exists")
    return GpuInfo(
        vendor="nvidia", name=f"{_TEGRA_SOCS[soc]} integrated GPU ({soc.split(',', 1)[1]})",
        integrated=True, driver=driver,
        driver_version=nvrm_version(root.read_text("proc/driver/nvidia/version")),
        evidence=tuple(evidence), confidence="high" if driver else "medium",
    )


def _int_attr(root: DeviceRoot, rel: str) -> int | None:
    line = root.read_line(rel) or ""
    return int(line) if line.isdigit() else None


@dataclass(frozen=True)
class _Shape:
    """What an AMD GPU's own attributes say about whether it is an APU's iGPU."""

    integrated: bool
    confidence: Confidence
    evidence: tuple[str, ...]


def _amd_integrated(root: DeviceRoot, dev: PciDevice, pci: list[PciDevice],
                    cpu_model: str | None, smallest: bool) -> _Shape:
    """The class rule for AMD GPUs (docs/hardware.md), first match wins:

    1. an AMD SoC function (vendor 0x1022: PSP, USB, audio coprocessor, NPU) on the GPU's
       own PCI bus: the GPU is a function of the SoC → integrated, high;
    2. a sign only discrete cards give — `mem_info_vram_vendor` (the card's GDDR maker),
       `pcie_bw` (amdgpu hides it on APUs), or less VRAM CPU-visible than there is (a BAR
       window) → discrete, high;
    3. the VRAM is a carve-out: all of it CPU-visible and GTT at least four times as big
       → integrated, high when the CPU's name also names Radeon graphics, else medium;
    4. the CPU's name names Radeon graphics (`... w/ Radeon 780M Graphics`) and this is
       the AMD GPU with the least VRAM → integrated, low;
    5. otherwise discrete: high with its VRAM size known, else medium.
    """
    bus = dev.address.rsplit(":", 1)[0]
    siblings = [d for d in pci if d.vendor == _AMD_SOC and d.address.rsplit(":", 1)[0] == bus]
    vram = _int_attr(root, f"{dev.sysfs}/mem_info_vram_total")
    visible = _int_attr(root, f"{dev.sysfs}/mem_info_vis_vram_total")
    gtt = _int_attr(root, f"{dev.sysfs}/mem_info_gtt_total")
    radeon_cpu = bool(cpu_model and _CPU_NAMES_RADEON.search(cpu_model))
    memory = []
    if vram is not None:
        memory.append(f"{dev.sysfs}/mem_info_vram_total {_gib(vram)}"
                      + (f", vis_vram {_gib(visible)}" if visible is not None else "")
                      + (f", gtt {_gib(gtt)}" if gtt is not None else ""))
    cpu = [f"proc/cpuinfo model name: {cpu_model}"] if radeon_cpu else []
    if siblings:
        soc = ", ".join(f"{d.address} ({d.pci_id or 'vendor 1022'})" for d in siblings[:3])
        return _Shape(True, "high", (f"shares PCI bus {bus} with AMD SoC functions: {soc}",
                                     *memory, *cpu))
    discrete = []
    if root.exists(f"{dev.sysfs}/mem_info_vram_vendor"):
        vendor = root.read_line(f"{dev.sysfs}/mem_info_vram_vendor")
        discrete.append(f"{dev.sysfs}/mem_info_vram_vendor: {vendor} (its own GDDR memory)")
    if root.exists(f"{dev.sysfs}/pcie_bw"):
        discrete.append(f"{dev.sysfs}/pcie_bw exists (amdgpu hides it on APUs)")
    if vram is not None and visible is not None and visible < vram:
        discrete.append(f"only {_gib(visible)} of {_gib(vram)} VRAM is CPU-visible (a BAR)")
    if discrete:
        return _Shape(False, "high", (*discrete, *memory))
    if (vram is not None and gtt is not None and visible in (None, vram)
            and gtt >= _CARVE_OUT_GTT_FACTOR * vram):
        carve = f"VRAM {_gib(vram)} is a carve-out: GTT {_gib(gtt)} is ≥{_CARVE_OUT_GTT_FACTOR}×"
        return _Shape(True, "high" if radeon_cpu else "medium", (carve, *memory, *cpu))
    if radeon_cpu and smallest:
        return _Shape(True, "low", (*cpu, "the AMD GPU with the least VRAM", *memory))
    return _Shape(False, "high" if vram is not None else "medium", tuple(memory))


def _pci_other_gpus(root: DeviceRoot, pci: list[PciDevice], cpu_model: str | None) -> list[GpuInfo]:
    devices: list[tuple[PciDevice, GpuVendor]] = []
    for dev in pci:
        by_driver = _DRIVER_GPU.get(dev.driver or "")
        if not (dev.is_display or (dev.pci_class is None and by_driver is not None)):
            continue
        if dev.vendor == _NVIDIA or by_driver == "nvidia" or dev.vendor in _DISPLAY_ONLY_VENDORS:
            continue
        vendor: GpuVendor = by_driver or "other"
        if dev.vendor is not None:
            vendor = _PCI_VENDOR_GPU.get(dev.vendor, "other")
        devices.append((dev, vendor))
    amd_vram = {d.address: _int_attr(root, f"{d.sysfs}/mem_info_vram_total") or 0
                for d, v in devices if v == "amd"}
    least = min(amd_vram, key=lambda a: (amd_vram[a], a)) if amd_vram else None
    out: list[GpuInfo] = []
    for dev, vendor in devices:
        label = {"amd": "AMD", "intel": "Intel"}.get(vendor, "Unknown")
        name = root.read_line(f"{dev.sysfs}/product_name") or " ".join(
            filter(None, [label, "GPU", dev.pci_id]))
        evidence = [dev.describe()]
        memory, integrated = None, False
        confidence: Confidence = "high" if dev.driver else "medium"
        if vendor == "amd":
            memory = _int_attr(root, f"{dev.sysfs}/mem_info_vram_total")
            shape = _amd_integrated(root, dev, pci, cpu_model, dev.address == least)
            integrated = shape.integrated
            if integrated and cpu_model and (m := _RADEON_NAME.search(cpu_model)):
                name = f"AMD {m.group(0).strip()} ({dev.pci_id or 'integrated'})"
            evidence += [("integrated: " if integrated else "discrete: ") + e
                         for e in shape.evidence[:1]] + list(shape.evidence[1:])
            confidence = min(confidence, shape.confidence, key=_RANK.__getitem__)
        elif vendor == "intel" and dev.address.startswith("0000:00:"):
            # Intel puts its iGPU on the root bus; its discrete Arc cards sit behind bridges.
            integrated = True
            evidence.append("integrated: on the root bus 00, where Intel puts its iGPU")
        out.append(GpuInfo(
            vendor=vendor, name=name, integrated=integrated, memory_bytes=memory,
            driver=dev.driver, pci_id=dev.pci_id, pci_address=dev.address,
            evidence=tuple(evidence), confidence=confidence,
        ))
    return out


_RANK: dict[Confidence, int] = {"low": 0, "medium": 1, "high": 2}


@dataclass
class _Soc:
    """One SoC GPU being assembled from what the root shows of it."""

    device: str
    vendor: GpuVendor | None = None
    driver: str | None = None
    compatible: str | None = None
    confidence: Confidence = "low"
    evidence: list[str] = field(default_factory=list)
    on_soc: bool = True  # False: only a PCI GPU driver's module was seen

    def seen(self, confidence: Confidence, evidence: str) -> None:
        if evidence not in self.evidence:
            self.evidence.append(evidence)
        if _RANK[confidence] > _RANK[self.confidence]:
            self.confidence = confidence


def _compatible_vendor(compatible: tuple[str, ...]) -> tuple[str, GpuVendor] | None:
    for c in compatible:
        for prefix, vendor in _GPU_COMPATIBLE:
            if c.startswith(prefix):
                return c, vendor
    return None


def _soc_gpus(root: DeviceRoot, compatible: tuple[str, ...], pci: list[PciDevice],
              found: list[GpuInfo]) -> list[GpuInfo]:
    soc: dict[str, _Soc] = {}

    def consider(dev: PlatformDevice, why: str | None) -> None:
        by_driver = _SOC_GPU_DRIVERS.get((dev.driver or "").lower())
        by_compat = _compatible_vendor(dev.compatible)
        kbase = dev.power_policy is not None  # only mali_kbase creates power_policy
        if why is None and by_driver is None and by_compat is None:
            return
        gpu = soc.setdefault(dev.name, _Soc(dev.name))
        if by_driver is not None:
            gpu.vendor, gpu.driver = by_driver, dev.driver
            gpu.seen("high", dev.describe())
        elif by_compat is not None:
            gpu.vendor, gpu.compatible = by_compat[1], by_compat[0]
            gpu.seen("medium", dev.describe())
        if by_compat is not None:
            gpu.compatible = by_compat[0]
        if kbase:
            gpu.vendor = gpu.vendor or "arm"
            gpu.seen("medium", f"{dev.sysfs}/power_policy: {dev.power_policy} (a mali_kbase "
                               "attribute: an Arm Mali GPU)")
        if why is not None:
            gpu.seen("medium" if gpu.vendor else "low", why)

    for dev in platform_devices(root):
        consider(dev, None)
    for card, parent in drm_card_parents(root).items():
        dev = platform_device(root, parent)
        if _SOC_GPU_DRIVERS.get((dev.driver or "").lower()) is not None or is_node(
                parent, "gpu", "mali"):
            consider(dev, f"sys/class/drm/{card} belongs to {parent}, not a PCI device")
    for node in devfreq_nodes(root):
        if is_node(node.name, "gpu", "mali"):
            consider(platform_device(root, node.name), node.describe())
    soc_vendor = next((v for c in compatible[-1:] for p, v in _SOC_VENDOR_GPU.items()
                       if c.startswith(f"{p},")), None)
    for module, where in sorted(loaded_modules(root).items()):
        vendor = _SOC_GPU_DRIVERS.get(module)
        if vendor is None and not pci:  # a PCI GPU driver loaded, but no PCI list readable
            vendor = _DRIVER_GPU.get(module)
        if vendor is None or any(g.vendor == vendor for g in found):
            continue
        said = f"{where}: the {module} module is loaded"
        # a GPU seen some other way is the module's, when nothing says otherwise
        mine = next((g for g in soc.values() if g.vendor in (None, vendor)), None)
        if mine is not None:
            mine.vendor = vendor
            mine.seen("low", said)
        else:
            soc[module] = _Soc(f"module {module}", vendor, module,
                               on_soc=module in _SOC_GPU_DRIVERS)
            soc[module].seen("low", f"{said}; no device of it was seen")
    out: list[GpuInfo] = []
    tegra = any(g.vendor == "nvidia" and g.integrated for g in found)
    for gpu in soc.values():
        vendor = gpu.vendor
        if vendor is None and soc_vendor is not None:
            vendor = soc_vendor
            gpu.seen("medium", f"proc/device-tree/compatible: {compatible[-1]} (this vendor's "
                               "SoCs have its own GPU)")
        vendor = vendor or "other"
        if vendor == "nvidia" and tegra:
            continue  # the Tegra rule already reported the one GPU of a Jetson
        label = _DRIVER_LABEL.get(gpu.driver or "", _VENDOR_LABEL[vendor])
        where = gpu.compatible or gpu.device
        out.append(GpuInfo(
            vendor=vendor, name=f"{label} ({where})", integrated=gpu.on_soc,
            driver=gpu.driver, evidence=tuple(gpu.evidence), confidence=gpu.confidence,
        ))
    return out


def detect_gpus(root: DeviceRoot, compatible: tuple[str, ...], pci: list[PciDevice],
                cpu_model: str | None = None) -> tuple[GpuInfo, ...]:
    """Every GPU the root shows: NVIDIA, Jetson's, the rest on PCI, then SoC GPUs off PCI."""
    gpus = _nvidia_gpus(root, pci)
    if not any(g.integrated for g in gpus) and (tegra := _tegra_gpu(root, compatible)):
        gpus.append(tegra)
    gpus += _pci_other_gpus(root, pci, cpu_model)
    return tuple(gpus + _soc_gpus(root, compatible, pci, gpus))
