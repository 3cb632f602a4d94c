"""GPUs: which ones a device root shows (NVIDIA discrete and Jetson, AMD, Intel, others).

Read under the root:

- PCI display devices (`agent.hardware.pci`); BMC and paravirtual display adapters are
  skipped, since a VGA port is not something to run a model on.
- NVIDIA: `proc/driver/nvidia/version`, `proc/driver/nvidia/gpus/<addr>/information`
  and nvidia-smi (`agent.hardware.nvidia_smi`), merged per PCI address.
- Jetson: a device-tree `compatible` of `nvidia,tegra*` means an integrated GPU.
- AMD: `mem_info_vram_total` and `product_name` beside the PCI device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.hardware.devroot import DeviceRoot
from agent.hardware.nvidia_smi import nvidia_smi_report
from agent.hardware.pci import PciDevice, normalize_pci_address
from registry.profile import GpuInfo, GpuVendor

_NVIDIA = 0x10DE
_PCI_VENDOR_GPU: dict[int, GpuVendor] = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}
_DRIVER_GPU: dict[str, GpuVendor] = {
    "nvidia": "nvidia", "nouveau": "nvidia", "amdgpu": "amd", "radeon": "amd",
    "i915": "intel", "xe": "intel",
}
# BMC and paravirtual display adapters: a VGA port, not something to run a model on.
_DISPLAY_ONLY_VENDORS = {0x1A03, 0x102B, 0x15AD, 0x1B36, 0x1AF4, 0x1013, 0x1234, 0x1414}
_TEGRA_SOCS = {"nvidia,tegra264": "Thor", "nvidia,tegra234": "Orin",
               "nvidia,tegra194": "Xavier", "nvidia,tegra186": "TX2", "nvidia,tegra210": "TX1"}

_NVRM = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)")


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
    """Every GPU the root shows: NVIDIA (PCI, proc, nvidia-smi), Jetson's, then the rest."""
    gpus = _nvidia_gpus(root, pci)
    if not any(g.integrated for g in gpus) and (tegra := _tegra_gpu(root, compatible)):
        gpus.append(tegra)
    return tuple(gpus + _other_gpus(root, pci))
