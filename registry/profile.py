"""The hardware profile: what a device has, as data that selection reads.

It lives in `registry` (not `agent`) because selection is a pure function over it and
`registry` never imports `agent`; `agent.hardware` is what fills it in from a device.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GpuVendor = Literal["nvidia", "amd", "intel", "other"]
NpuKind = Literal["intel-npu", "amd-xdna", "qualcomm-hexagon", "rockchip-rknpu", "hailo"]


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
    total_bytes: int = Field(ge=0)
    available_bytes: int = Field(ge=0)


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


class NpuInfo(_Frozen):
    """One NPU or DSP accelerator. `online` is False when present but not usable."""

    kind: NpuKind
    name: str
    driver: str | None = None
    device_node: str | None = Field(default=None, description="/dev entry used to reach it.")
    online: bool = True
    detail: str | None = Field(default=None, description="Why it is offline, firmware version, ...")


class RuntimeInfo(_Frozen):
    """What the installed inference runtimes can actually use on this device."""

    llama_cpp_version: str | None = None
    llama_gpu_offload: bool = Field(
        default=False, description="llama.cpp was built with a GPU backend it can offload to."
    )
    llama_backends: tuple[str, ...] = Field(
        default=(), description="cuda, metal, vulkan, rocm, ..."
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
