"""The hardware profile: what a device has, as data that selection reads.

It lives in `registry` (not `agent`) because selection is a pure function over it and
`registry` never imports `agent`; `agent.hardware` is what fills it in from a device.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# "arm" (Mali) and "qualcomm" (Adreno) are SoC GPUs off PCI; "other" is any vendor without
# a selection target of its own (Broadcom V3D, Vivante, PowerVR, unknown PCI vendors).
GpuVendor = Literal["nvidia", "amd", "intel", "arm", "qualcomm", "other"]
# "other": an NPU this agent has no runtime for (seen, reported, never selected).
NpuKind = Literal[
    "intel-npu", "amd-xdna", "qualcomm-hexagon", "rockchip-rknpu", "hailo", "other"
]
# How sure detection is that the accelerator exists and is what it says (docs/hardware.md):
# high — its own device entry with a driver bound, or the driver's own report; medium — the
# device is described (PCI IDs, device-tree node, devfreq node) but no driver is seen bound,
# or a class rule read a property (integrated) from indirect signals; low — known only
# indirectly (a loaded module, a kernel-log line, a firmware file, the SoC's vendor).
Confidence = Literal["high", "medium", "low"]
# online: usable now; offline: present but not usable (why in `detail`); unknown: present,
# but nothing said whether its driver is up (e.g. seen only through its devfreq node).
NpuState = Literal["online", "offline", "unknown"]

_EVIDENCE = "What said so: the files read and the lines matched, most telling first."


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuInfo(_Frozen):
    """The CPU: identity, core counts and the ISA features inference kernels use."""

    arch: str = Field(description="Machine architecture as uname reports it (x86_64, aarch64).")
    vendor: str | None = Field(default=None, description="GenuineIntel, AuthenticAMD, ARM, ...")
    model: str | None = Field(default=None, description="Marketing name or core type.")
    cores_physical: int = Field(ge=0, description="Physical cores (0 when unknown).")
    cores_logical: int = Field(ge=0, description="Logical CPUs (threads).")
    features: tuple[str, ...] = Field(
        default=(), description="Normalised ISA features relevant to llama.cpp / ONNX Runtime."
    )

    def has(self, feature: str) -> bool:
        return feature in self.features


class MemoryInfo(_Frozen):
    """System RAM. None: the device did not say (no readable `/proc/meminfo`), which is not
    the same as 0 bytes — selection then says "memory unknown" for RAM-budgeted devices."""

    total_bytes: int | None = Field(ge=0, description="MemTotal in bytes; None: unknown.")
    available_bytes: int | None = Field(
        ge=0, description="MemAvailable (or free + buffers + cache) in bytes; None: unknown."
    )

    @property
    def known(self) -> bool:
        return self.total_bytes is not None


class GpuInfo(_Frozen):
    """One GPU. `integrated` GPUs share system RAM (Jetson, most iGPUs)."""

    vendor: GpuVendor
    name: str
    integrated: bool = False
    memory_bytes: int | None = Field(
        default=None, description="Dedicated memory; None if shared/unknown."
    )
    driver: str | None = Field(
        default=None, description="Kernel driver name (nvidia, amdgpu, i915, xe, nvgpu)."
    )
    driver_version: str | None = None
    compute_api_version: str | None = Field(default=None, description="CUDA version for NVIDIA.")
    pci_id: str | None = Field(default=None, description="vendor:device in hex, when on PCI.")
    pci_address: str | None = Field(
        default=None, description="domain:bus:device.function, when on PCI (0000:64:00.0)."
    )
    evidence: tuple[str, ...] = Field(default=(), description=_EVIDENCE)
    confidence: Confidence = "high"


class NpuInfo(_Frozen):
    """One NPU or DSP accelerator. `online` is True exactly when `state` is "online": an
    NPU whose state is unknown is reported but not offered to selection."""

    kind: NpuKind
    name: str
    driver: str | None = None
    device_node: str | None = Field(default=None, description="/dev entry used to reach it.")
    online: bool = True
    state: NpuState = "online"
    detail: str | None = Field(default=None, description="Why it is offline, firmware version, ...")
    generation: str | None = Field(
        default=None,
        description="Hardware generation (Intel 37xx/40xx/50xx, AMD XDNA/XDNA 2), from the PCI "
        "ID, the firmware the driver loaded or the driver's messages.",
    )
    pci_address: str | None = Field(default=None, description="domain:bus:device.function.")
    evidence: tuple[str, ...] = Field(default=(), description=_EVIDENCE)
    confidence: Confidence = "high"

    @model_validator(mode="before")
    @classmethod
    def _fill_state_or_online(cls, data: Any) -> Any:
        """Either of `online` and `state` may be given; the other follows from it."""
        if isinstance(data, dict):
            online, state = data.get("online"), data.get("state")
            if state is None and online is not None:
                data = {**data, "state": "online" if online else "offline"}
            elif online is None and state is not None:
                data = {**data, "online": state == "online"}
        return data

    @model_validator(mode="after")
    def _online_matches_state(self) -> NpuInfo:
        if self.online != (self.state == "online"):
            raise ValueError(f"online={self.online} contradicts state={self.state!r}")
        return self


class RuntimeInfo(_Frozen):
    """What the installed inference runtimes can actually use on this device."""

    llama_cpp_version: str | None = None
    llama_gpu_offload: bool = Field(
        default=False, description="llama.cpp was built with a GPU backend it can offload to."
    )
    llama_backends: tuple[str, ...] = Field(
        default=(), description="cuda, metal, vulkan, rocm, ..."
    )
    llama_cpu_features: tuple[str, ...] = Field(
        default=(), description="CPU features llama.cpp's CPU backend was compiled for (as "
        "CpuInfo.features names them); a CPU lacking one would stop it with SIGILL."
    )
    onnxruntime_version: str | None = None
    onnx_providers: tuple[str, ...] = Field(default=(), description="get_available_providers()")
    backends: tuple[str, ...] | None = Field(
        default=None,
        description=(
            "Model formats this agent has an installed, importable backend for (gguf, onnx); "
            "None: not known, not checked."
        ),
    )


def llama_features_missing(cpu: CpuInfo, runtimes: RuntimeInfo) -> tuple[str, ...]:
    """CPU features the llama.cpp build needs that `cpu` lacks (none when either side is
    unknown: a tree without a cpuinfo, a runtime without a system info)."""
    if not cpu.features:
        return ()
    return tuple(f for f in runtimes.llama_cpu_features if f not in cpu.features)


class HardwareProfile(_Frozen):
    """Everything selection needs to know about a device."""

    cpu: CpuInfo
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...] = ()
    npus: tuple[NpuInfo, ...] = ()
    board: str | None = Field(default=None, description="Device-tree model, or DMI product name.")
    compatible: tuple[str, ...] = Field(default=(), description="Device-tree compatible strings.")
    hypervisor: str | None = Field(default=None, description="Set when running in a VM.")
    runtimes: RuntimeInfo = RuntimeInfo()

    def gpu(self, vendor: GpuVendor) -> GpuInfo | None:
        return next((g for g in self.gpus if g.vendor == vendor), None)

    def npu(self, kind: NpuKind) -> NpuInfo | None:
        return next((n for n in self.npus if n.kind == kind and n.online), None)
