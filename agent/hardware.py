"""Hardware detection: owns turning a device's `/` (or a captured tree) into a `HardwareProfile`.

`detect(root)` reads only under `root`, a directory laid out like a device's `/`:

- CPU: `proc/cpuinfo`, `proc/sys/kernel/arch`; memory: `proc/meminfo`.
- Board: `proc/device-tree/{model,compatible}` (NUL separated), then the Raspberry Pi
  `Model` line of `proc/cpuinfo`, then DMI `sys/class/dmi/id/{sys_vendor,product_name}`.
- Virtualisation: the `hypervisor` CPU flag, DMI vendor strings, `sys/hypervisor/type`.
- GPUs and NPUs: see `agent.hardware_accel`.

A missing or unreadable file means "not present" and malformed content is skipped; the
profile then says 0 / None / empty. Trees built from captures (`tests/fixtures/hw/`)
differ from a live system in two ways detection accepts: a sysfs `driver` may be a plain
file holding the driver's name instead of a symlink, and device nodes such as
`dev/accel/accel0` are empty regular files.

Captures a support bundle carries inside the tree, under `var/lib/edge-agent/capture/`:
`nvidia-smi-q.xml` (`nvidia-smi -q -x`), `nvidia-smi.txt` (plain `nvidia-smi`) and
`runtimes.json` (a `RuntimeInfo` as JSON). On the live system (`root` is `/`) detection
instead runs `nvidia-smi -q -x` when it is installed and, with `probe_runtimes`, imports
llama_cpp and onnxruntime; under a tree it never looks at the live system.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.devroot import DeviceRoot
from agent.hardware_accel import (
    CAPTURE_DIR,
    NVIDIA_SMI_TEXT,
    NVIDIA_SMI_XML,
    detect_gpus,
    detect_npus,
    pci_devices,
)
from registry.profile import CpuInfo, HardwareProfile, MemoryInfo, RuntimeInfo

__all__ = ["NVIDIA_SMI_TEXT", "NVIDIA_SMI_XML", "RUNTIMES_JSON", "detect", "summary"]

RUNTIMES_JSON = f"{CAPTURE_DIR}/runtimes.json"

# x86 flags as the kernel names them that llama.cpp / ONNX Runtime pick kernels by.
_X86_FEATURES = frozenset({
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx_vnni", "avx_vnni_int8", "avx512f", "avx512cd", "avx512dq", "avx512bw", "avx512vl",
    "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg",
    "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "amx_fp16",
})
_X86_RENAME = {"pni": "sse3"}
# arm64 hwcaps → the names llama.cpp uses; anything unlisted is not reported.
_ARM_FEATURES = {
    "asimd": "neon", "neon": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve",
    "sve2": "sve2", "svei8mm": "sve_i8mm", "bf16": "bf16", "fphp": "fp16", "asimdhp": "fp16",
    "asimdfhm": "fhm", "sme": "sme", "sme2": "sme2",
}
_ARM_IMPLEMENTERS = {
    0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x48: "HiSilicon", 0x4E: "NVIDIA",
    0x51: "Qualcomm", 0x61: "Apple", 0x6D: "Microsoft", 0xC0: "Ampere",
}
# (implementer, part) → core name, as lscpu and the kernel's cputype.h name them.
_ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE", (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4B): "Cortex-A78C", (0x41, 0xD4F): "Neoverse-V2", (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4", (0x41, 0xD84): "Neoverse-V3",
    (0x41, 0xD87): "Cortex-A725", (0x41, 0xD85): "Cortex-X925", (0x4E, 0x004): "Carmel",
    (0x51, 0x001): "Oryon-X1", (0xC0, 0xAC3): "Ampere-1", (0xC0, 0xAC4): "Ampere-1a",
}
_DMI_PLACEHOLDERS = {"to be filled by o.e.m.", "default string", "system product name",
                     "system manufacturer", "not specified", "none", "o.e.m.", "unknown"}
_MEMINFO_LINE = re.compile(r"^(\w+):\s+(\d+)\s*(kB)?\s*$")


def detect(root: Path = Path("/"), *, probe_runtimes: bool = True) -> HardwareProfile:
    """Detect what the device at `root` has; never raises on a missing or odd file.

    `probe_runtimes` on the live system imports llama_cpp and onnxruntime; under a tree it
    reads the tree's captured `runtimes.json` instead (the live system is never probed).
    """
    dev = DeviceRoot(root)
    # Big hosts print ~1.5 KiB per CPU; allow for a few thousand of them.
    cpuinfo = _parse_cpuinfo(dev.read_text("proc/cpuinfo", limit=8 << 20) or "")
    compatible = _compatible(dev)
    pci = pci_devices(dev)
    runtimes = RuntimeInfo()
    if probe_runtimes:
        runtimes = _probe_runtimes() if dev.is_live else _captured_runtimes(dev)
    return HardwareProfile(
        cpu=_cpu(dev, cpuinfo),
        memory=_memory(dev),
        gpus=detect_gpus(dev, compatible, pci),
        npus=detect_npus(dev, compatible, pci),
        board=_board(dev, cpuinfo),
        compatible=compatible,
        hypervisor=_hypervisor(dev, cpuinfo),
        runtimes=runtimes,
    )


# --- CPU ---------------------------------------------------------------------------


class _CpuInfoText:
    """`/proc/cpuinfo` split into per-processor blocks plus the trailing global lines."""

    def __init__(self, processors: list[dict[str, str]], globals_: dict[str, str]) -> None:
        self.processors = processors
        self.globals = globals_

    def first(self, key: str) -> str | None:
        return next((p[key] for p in self.processors if p.get(key)), None)

    def all_have(self, *keys: str) -> bool:
        return bool(self.processors) and all(k in p for p in self.processors for k in keys)


def _parse_cpuinfo(text: str) -> _CpuInfoText:
    processors: list[dict[str, str]] = []
    globals_: dict[str, str] = {}
    current: dict[str, str] | None = None
    for raw in text.replace("\x00", "").splitlines():
        key, sep, value = raw.partition(":")
        key, value = key.strip(), value.strip()
        if not raw.strip():
            current = None
            continue
        if not sep or not key:
            continue
        if key == "processor" and value.isdigit():
            current = {}
            processors.append(current)
            continue
        target = current if current is not None else globals_
        target.setdefault(key, value)
    return _CpuInfoText(processors, globals_)


def _int(text: str | None, base: int = 10) -> int | None:
    try:
        return int(text or "", base)
    except ValueError:
        return None


def _count_cpu_list(text: str | None) -> int:
    """Count a kernel CPU list such as `0-3,8-11`; 0 when malformed."""
    total = 0
    for part in (text or "").strip().split(","):
        lo, dash, hi = part.partition("-")
        a, b = _int(lo), _int(hi) if dash else _int(lo)
        if a is None or b is None or b < a:
            return 0
        total += b - a + 1
    return total


def _arch(dev: DeviceRoot, info: _CpuInfoText) -> str:
    if arch := dev.read_line("proc/sys/kernel/arch"):
        return arch
    if dev.is_live and (machine := platform.machine()):
        return machine
    if flags := info.first("flags"):
        return "x86_64" if "lm" in flags.split() else "i686"
    cpu_arch = info.first("CPU architecture")
    if cpu_arch == "8" and "asimd" in (info.first("Features") or "").split():
        return "aarch64"
    if cpu_arch in ("7", "8"):
        return "armv7l"
    return "unknown"


def _features(info: _CpuInfoText) -> tuple[str, ...]:
    # Intersection across CPUs: a thread may land on any core of a heterogeneous SoC.
    sets: list[set[str]] = []
    for p in info.processors:
        if "flags" in p:
            sets.append({_X86_RENAME.get(f, f) for f in p["flags"].split()} & _X86_FEATURES)
        elif "Features" in p:
            sets.append({_ARM_FEATURES[f] for f in p["Features"].split() if f in _ARM_FEATURES})
    common = set.intersection(*sets) if sets else set()
    return tuple(sorted(common))


def _arm_identity(info: _CpuInfoText) -> tuple[str | None, str | None]:
    vendors: list[str] = []
    cores: Counter[str] = Counter()
    for p in info.processors:
        impl, part = _int(p.get("CPU implementer"), 16), _int(p.get("CPU part"), 16)
        if impl is None:
            continue
        vendors.append(_ARM_IMPLEMENTERS.get(impl, f"implementer {impl:#x}"))
        if part is not None and (name := _ARM_PARTS.get((impl, part))):
            cores[name] += 1
    vendor = vendors[0] if vendors else None
    if not cores:
        return vendor, info.first("model name")
    if len(cores) == 1:
        return vendor, next(iter(cores))
    return vendor, " + ".join(f"{n}x {name}" for name, n in sorted(cores.items()))


def _cpu(dev: DeviceRoot, info: _CpuInfoText) -> CpuInfo:
    logical = len(info.processors)
    if logical == 0:
        logical = _count_cpu_list(dev.read_line("sys/devices/system/cpu/online"))
    if logical == 0 and dev.is_live:
        logical = os.cpu_count() or 0
    if info.first("vendor_id") or info.first("flags"):
        vendor, model = info.first("vendor_id"), info.first("model name")
        physical = _x86_physical_cores(info)
    else:
        vendor, model = _arm_identity(info)
        physical = logical  # no Arm core in these SoCs runs two threads
    return CpuInfo(arch=_arch(dev, info), vendor=vendor, model=model,
                   cores_physical=physical, cores_logical=logical, features=_features(info))


def _x86_physical_cores(info: _CpuInfoText) -> int:
    if info.all_have("physical id", "core id"):
        return len({(p["physical id"], p["core id"]) for p in info.processors})
    per_package: dict[str, int] = {}
    for p in info.processors:
        cores = _int(p.get("cpu cores"))
        if cores is not None:
            per_package[p.get("physical id", "0")] = cores
    return sum(per_package.values())


# --- memory, board, virtualisation -------------------------------------------------


def _memory(dev: DeviceRoot) -> MemoryInfo:
    fields: dict[str, int] = {}
    for line in (dev.read_text("proc/meminfo") or "").splitlines():
        if m := _MEMINFO_LINE.match(line.strip()):
            fields.setdefault(m.group(1), int(m.group(2)) * (1024 if m.group(3) else 1))
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14 lack MemAvailable
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return MemoryInfo(total_bytes=total, available_bytes=min(available, total))


def _dt(dev: DeviceRoot, name: str) -> bytes | None:
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        if (data := dev.read_bytes(f"{base}/{name}", 64 * 1024)) is not None:
            return data
    return None


def _compatible(dev: DeviceRoot) -> tuple[str, ...]:
    data = _dt(dev, "compatible") or b""
    parts = (p.decode("utf-8", errors="replace").strip() for p in data.split(b"\x00"))
    return tuple(p for p in parts if p and p.isprintable())


def _dmi(dev: DeviceRoot, name: str) -> str | None:
    value = dev.read_line(f"sys/class/dmi/id/{name}")
    return None if value is None or value.lower() in _DMI_PLACEHOLDERS else value


def _board(dev: DeviceRoot, info: _CpuInfoText) -> str | None:
    model = (_dt(dev, "model") or b"").split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    if model:
        return model
    if pi_model := info.globals.get("Model"):  # Raspberry Pi kernels copy the DT model here
        return pi_model
    vendor, product = _dmi(dev, "sys_vendor"), _dmi(dev, "product_name")
    if product and vendor and not product.lower().startswith(vendor.lower()):
        return f"{vendor} {product}"
    return product or vendor


def _hypervisor(dev: DeviceRoot, info: _CpuInfoText) -> str | None:
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


# --- runtimes ----------------------------------------------------------------------


_LLAMA_BACKENDS = {"cuda": "cuda", "metal": "metal", "vulkan": "vulkan", "rocm": "rocm",
                   "hip": "rocm", "sycl": "sycl", "opencl": "opencl", "cann": "cann",
                   "musa": "musa", "kompute": "kompute"}


def _llama_backends(system_info: str) -> tuple[str, ...]:
    found: set[str] = set()
    for m in re.finditer(r"(?:^|\|)\s*([A-Za-z]+)\s*(:|=\s*1)", system_info):
        if (name := _LLAMA_BACKENDS.get(m.group(1).lower())) is not None:
            found.add(name)
    return tuple(sorted(found))


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # missing, or a wheel whose native library will not load
        return None


def _probe_runtimes() -> RuntimeInfo:
    fields: dict[str, Any] = {}
    if (llama := _import("llama_cpp")) is not None:
        fields["llama_cpp_version"] = str(getattr(llama, "__version__", "")) or None
        with contextlib.suppress(Exception):
            fields["llama_gpu_offload"] = bool(llama.llama_supports_gpu_offload())
        with contextlib.suppress(Exception):
            raw = llama.llama_print_system_info()
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            fields["llama_backends"] = _llama_backends(text)
    if (ort := _import("onnxruntime")) is not None:
        fields["onnxruntime_version"] = str(getattr(ort, "__version__", "")) or None
        with contextlib.suppress(Exception):
            fields["onnx_providers"] = tuple(str(p) for p in ort.get_available_providers())
    return RuntimeInfo(**fields)


def _captured_runtimes(dev: DeviceRoot) -> RuntimeInfo:
    text = dev.read_text(RUNTIMES_JSON)
    if not text:
        return RuntimeInfo()
    try:
        return RuntimeInfo.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return RuntimeInfo()


# --- summary -----------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "unknown" if not n else f"{n / 2**30:.1f} GiB"


def summary(profile: HardwareProfile) -> str:
    """A readable multi-line report, as `edge-agent device info` prints it."""
    cpu, mem = profile.cpu, profile.memory
    name = " ".join(filter(None, [cpu.vendor, cpu.model])) or "unknown CPU"
    lines = [
        f"Board:       {profile.board or 'unknown'}",
        f"CPU:         {name} ({cpu.arch}), {cpu.cores_physical or '?'} cores / "
        f"{cpu.cores_logical or '?'} threads",
        f"ISA:         {' '.join(cpu.features) or 'none detected'}",
        f"Memory:      {_gib(mem.total_bytes)} total, {_gib(mem.available_bytes)} available",
    ]
    if profile.compatible:
        lines.insert(1, f"Compatible:  {', '.join(profile.compatible)}")
    if not profile.gpus:
        lines.append("GPU:         none")
    for g in profile.gpus:
        bits = ["integrated" if g.integrated else _gib(g.memory_bytes)]
        bits += [f"driver {g.driver}" + (f" {g.driver_version}" if g.driver_version else "")
                 if g.driver else ""]
        bits += [f"CUDA {g.compute_api_version}" if g.compute_api_version else "",
                 f"pci {g.pci_id}" if g.pci_id else ""]
        lines.append(f"GPU:         {g.name} [{g.vendor}] ({', '.join(b for b in bits if b)})")
    if not profile.npus:
        lines.append("NPU:         none")
    for n in profile.npus:
        state = "online" if n.online else "OFFLINE"
        extra = ", ".join(filter(None, [n.driver and f"driver {n.driver}", n.device_node,
                                        n.detail]))
        lines.append(f"NPU:         {n.name} [{n.kind}] {state}" + (f" ({extra})" if extra else ""))
    lines.append("Virtualised: " + (f"yes ({profile.hypervisor})" if profile.hypervisor
                                    else "no (or undetected)"))
    rt = profile.runtimes
    llama = "not installed"
    if rt.llama_cpp_version:
        offload = f"GPU offload via {', '.join(rt.llama_backends) or 'a GPU backend'}"
        llama = f"{rt.llama_cpp_version} ({offload if rt.llama_gpu_offload else 'CPU only'})"
    ort = "not installed"
    if rt.onnxruntime_version:
        ort = f"{rt.onnxruntime_version} ({', '.join(rt.onnx_providers) or 'no providers'})"
    lines += [f"llama.cpp:   {llama}", f"onnxruntime: {ort}"]
    return "\n".join(lines)
