"""The board: its model and device-tree `compatible`, and the hypervisor it runs under.

Read under the root:

- Model: `proc/device-tree/model` (or `sys/firmware/devicetree/base/model`), then the
  Raspberry Pi `Model` line of `proc/cpuinfo`, then DMI
  `sys/class/dmi/id/{sys_vendor,product_name}` (firmware placeholders count as absent).
- Compatible: the device tree's NUL-separated `compatible`.
- Virtualisation: DMI vendor strings, `sys/hypervisor/type`, then the `hypervisor` CPU flag.
"""

from __future__ import annotations

from agent.hardware.cpu import CpuInfoText
from agent.hardware.devroot import DeviceRoot

_DMI_PLACEHOLDERS = {"to be filled by o.e.m.", "default string", "system product name",
                     "system manufacturer", "not specified", "none", "o.e.m.", "unknown"}


def _dt(dev: DeviceRoot, name: str) -> bytes | None:
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        if (data := dev.read_bytes(f"{base}/{name}", 64 * 1024)) is not None:
            return data
    return None


def detect_compatible(dev: DeviceRoot) -> tuple[str, ...]:
    """The device tree's `compatible` strings, most specific first; empty without one."""
    data = _dt(dev, "compatible") or b""
    parts = (p.decode("utf-8", errors="replace").strip() for p in data.split(b"\x00"))
    return tuple(p for p in parts if p and p.isprintable())


def _dmi(dev: DeviceRoot, name: str) -> str | None:
    value = dev.read_line(f"sys/class/dmi/id/{name}")
    return None if value is None or value.lower() in _DMI_PLACEHOLDERS else value


def detect_board(dev: DeviceRoot, info: CpuInfoText) -> str | None:
    """The board's model name, from the device tree, cpuinfo or DMI; None when unknown."""
    model = (_dt(dev, "model") or b"").split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    if model:
        return model
    if pi_model := info.globals.get("Model"):  # Raspberry Pi kernels copy the DT model here
        return pi_model
    vendor, product = _dmi(dev, "sys_vendor"), _dmi(dev, "product_name")
    if product and vendor and not product.lower().startswith(vendor.lower()):
        return f"{vendor} {product}"
    return product or vendor


def detect_hypervisor(dev: DeviceRoot, info: CpuInfoText) -> str | None:
    """The hypervisor's name, `unknown` for an unnamed one, None on bare metal."""
    vendor = (_dmi(dev, "sys_vendor") or "").lower()
    product = (_dmi(dev, "product_name") or "").lower()
    known = None
    if "vmware" in vendor or product.startswith("vmware"):
        known = "VMware"
    elif vendor == "qemu" or "kvm" in product:
        known = "KVM" if "kvm" in product else "QEMU"
    elif "innotek" in vendor or "virtualbox" in product:
        known = "VirtualBox"
    elif vendor.startswith("microsoft") and product == "virtual machine":
        known = "Microsoft Hyper-V"
    elif vendor == "xen" or dev.read_line("sys/hypervisor/type") == "xen":
        known = "Xen"
    elif "parallels" in vendor:
        known = "Parallels"
    if known:
        return known
    flags = info.first("flags") or ""
    if "hypervisor" in flags.split():
        # The flag proves a VM but not whose; Amazon's DMI also covers bare-metal hosts.
        return "Amazon EC2" if vendor == "amazon ec2" else "unknown"
    return None
