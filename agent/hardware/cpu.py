"""The CPU: `proc/cpuinfo` parsed, and the arch, identity, core counts and ISA features.

Read under the root: `proc/cpuinfo`, `proc/sys/kernel/arch` and, when cpuinfo lists no
processors, `sys/devices/system/cpu/online`. Features are those llama.cpp and ONNX
Runtime pick kernels by, named as the kernel (x86) or llama.cpp (arm64) names them.
"""

from __future__ import annotations

import os
import platform
from collections import Counter

from agent.hardware.devroot import DeviceRoot
from registry.profile import CpuInfo

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


class CpuInfoText:
    """`/proc/cpuinfo` split into per-processor blocks plus the trailing global lines."""

    def __init__(self, processors: list[dict[str, str]], globals_: dict[str, str]) -> None:
        self.processors = processors
        self.globals = globals_

    def first(self, key: str) -> str | None:
        return next((p[key] for p in self.processors if p.get(key)), None)

    def all_have(self, *keys: str) -> bool:
        return bool(self.processors) and all(k in p for p in self.processors for k in keys)


def parse_cpuinfo(text: str) -> CpuInfoText:
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
    return CpuInfoText(processors, globals_)


def read_cpuinfo(dev: DeviceRoot) -> CpuInfoText:
    """The root's `proc/cpuinfo`, parsed; empty when absent."""
    # Big hosts print ~1.5 KiB per CPU; allow for a few thousand of them.
    return parse_cpuinfo(dev.read_text("proc/cpuinfo", limit=8 << 20) or "")


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


def _arch(dev: DeviceRoot, info: CpuInfoText) -> str:
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


def _features(info: CpuInfoText) -> tuple[str, ...]:
    # Intersection across CPUs: a thread may land on any core of a heterogeneous SoC.
    sets: list[set[str]] = []
    for p in info.processors:
        if "flags" in p:
            sets.append({_X86_RENAME.get(f, f) for f in p["flags"].split()} & _X86_FEATURES)
        elif "Features" in p:
            sets.append({_ARM_FEATURES[f] for f in p["Features"].split() if f in _ARM_FEATURES})
    common = set.intersection(*sets) if sets else set()
    return tuple(sorted(common))


def _arm_identity(info: CpuInfoText) -> tuple[str | None, str | None]:
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


def _x86_physical_cores(info: CpuInfoText) -> int:
    if info.all_have("physical id", "core id"):
        return len({(p["physical id"], p["core id"]) for p in info.processors})
    per_package: dict[str, int] = {}
    for p in info.processors:
        cores = _int(p.get("cpu cores"))
        if cores is not None:
            per_package[p.get("physical id", "0")] = cores
    return sum(per_package.values())


def detect_cpu(dev: DeviceRoot, info: CpuInfoText) -> CpuInfo:
    """Arch, vendor and model, physical and logical cores, and the common ISA features."""
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
