"""The device's `HardwareProfile`: `detect()` assembles it, `summary()` reports it."""

from __future__ import annotations

from pathlib import Path

from agent.hardware.board import detect_board, detect_compatible, detect_hypervisor
from agent.hardware.cpu import detect_cpu, read_cpuinfo
from agent.hardware.devroot import DeviceRoot
from agent.hardware.gpu import detect_gpus
from agent.hardware.memory import detect_memory
from agent.hardware.npu import detect_npus
from agent.hardware.pci import pci_devices
from agent.hardware.runtimes import detect_runtimes
from registry.profile import (
    GpuInfo,
    HardwareProfile,
    NpuInfo,
    RuntimeInfo,
    llama_features_missing,
)


def detect(root: Path = Path("/"), *, probe_runtimes: bool = True) -> HardwareProfile:
    """Detect what the device at `root` has; never raises on a missing or odd file.

    `probe_runtimes` on the live system imports llama_cpp and onnxruntime; under a tree it
    reads the tree's captured `runtimes.json` instead (the live system is never probed).
    """
    dev = DeviceRoot(root)
    cpuinfo = read_cpuinfo(dev)
    compatible = detect_compatible(dev)
    pci = pci_devices(dev)
    runtimes = detect_runtimes(dev) if probe_runtimes else RuntimeInfo()
    cpu = detect_cpu(dev, cpuinfo)
    return HardwareProfile(
        cpu=cpu,
        memory=detect_memory(dev),
        gpus=detect_gpus(dev, compatible, pci, cpu.model),
        npus=detect_npus(dev, compatible, pci),
        board=detect_board(dev, cpuinfo),
        compatible=compatible,
        hypervisor=detect_hypervisor(dev, cpuinfo),
        runtimes=runtimes,
    )


def _gib(n: int | None) -> str:
    return "unknown" if not n else f"{n / 2**30:.1f} GiB"


# Evidence items shown per accelerator in the text report; `--json` carries them all.
_EVIDENCE_SHOWN = 3


def _evidence(items: tuple[str, ...], confidence: str) -> str:
    shown = "; ".join(items[:_EVIDENCE_SHOWN])
    more = f" (+{len(items) - _EVIDENCE_SHOWN} more)" if len(items) > _EVIDENCE_SHOWN else ""
    return f"             {confidence} confidence: {shown or 'no evidence recorded'}{more}"


def _gpu_line(g: GpuInfo) -> str:
    if g.integrated:
        size = "integrated" + (f", {_gib(g.memory_bytes)} carve-out" if g.memory_bytes else "")
    else:
        size = _gib(g.memory_bytes)
    bits = [size]
    if g.driver:
        bits.append(f"driver {g.driver}" + (f" {g.driver_version}" if g.driver_version else ""))
    bits += [f"CUDA {g.compute_api_version}" if g.compute_api_version else "",
             f"pci {g.pci_id}" if g.pci_id else "", f"at {g.pci_address}" if g.pci_address else ""]
    return f"GPU:         {g.name} [{g.vendor}] ({', '.join(b for b in bits if b)})"


def _npu_line(n: NpuInfo) -> str:
    state = {"online": "online", "offline": "OFFLINE", "unknown": "state unknown"}[n.state]
    extra = ", ".join(filter(None, [n.generation and f"generation {n.generation}",
                                    n.driver and f"driver {n.driver}", n.device_node,
                                    n.pci_address and f"at {n.pci_address}", n.detail]))
    return f"NPU:         {n.name} [{n.kind}] {state}" + (f" ({extra})" if extra else "")


def summary(profile: HardwareProfile) -> str:
    """A readable multi-line report, as `edge-agent device info` prints it: each GPU and NPU
    with its confidence and the first pieces of evidence."""
    cpu, mem = profile.cpu, profile.memory
    name = " ".join(filter(None, [cpu.vendor, cpu.model])) or "unknown CPU"
    memory = (f"{_gib(mem.total_bytes)} total, {_gib(mem.available_bytes)} available"
              if mem.known else "unknown (no readable /proc/meminfo)")
    lines = [
        f"Board:       {profile.board or 'unknown'}",
        f"CPU:         {name} ({cpu.arch}), {cpu.cores_physical or '?'} cores / "
        f"{cpu.cores_logical or '?'} threads",
        f"ISA:         {' '.join(cpu.features) or 'none detected'}",
        f"Memory:      {memory}",
    ]
    if profile.compatible:
        lines.insert(1, f"Compatible:  {', '.join(profile.compatible)}")
    if not profile.gpus:
        lines.append("GPU:         none")
    for g in profile.gpus:
        lines += [_gpu_line(g), _evidence(g.evidence, g.confidence)]
    if not profile.npus:
        lines.append("NPU:         none")
    for n in profile.npus:
        lines += [_npu_line(n), _evidence(n.evidence, n.confidence)]
    lines.append("Virtualised: " + (f"yes ({profile.hypervisor})" if profile.hypervisor
                                    else "no (or undetected)"))
    rt = profile.runtimes
    llama = "not installed"
    if rt.llama_cpp_version:
        offload = f"GPU offload via {', '.join(rt.llama_backends) or 'a GPU backend'}"
        llama = f"{rt.llama_cpp_version} ({offload if rt.llama_gpu_offload else 'CPU only'})"
        if missing := llama_features_missing(profile.cpu, rt):
            llama += f"; NOT USABLE: built for CPU features this CPU lacks ({', '.join(missing)})"
    ort = "not installed"
    if rt.onnxruntime_version:
        ort = f"{rt.onnxruntime_version} ({', '.join(rt.onnx_providers) or 'no providers'})"
    lines += [f"llama.cpp:   {llama}", f"onnxruntime: {ort}"]
    return "\n".join(lines)
