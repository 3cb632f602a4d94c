"""Hardware detection: owns turning a device's `/` (or a captured tree) into a profile.

`detect(root)` fills in a `registry.profile.HardwareProfile` from what it reads under
`root`, a directory laid out like a device's `/`; `summary()` renders one for people.
Every read goes through `DeviceRoot`, so a missing or unreadable file means "not
present", malformed content is skipped, and the profile then says 0 / None / empty (RAM
without meminfo is None: unknown). Each GPU and NPU carries the evidence it was found by,
a confidence and its PCI address where it has one; the class rules are in
docs/hardware.md.
Under a tree nothing of the live system is looked at; on the live system (`root` is
`/`) nvidia-smi is run when installed and, with `probe_runtimes`, llama_cpp and
onnxruntime are imported — inside functions, never when this package is imported.

This package may import `registry.profile` and the standard library; it never imports
agent.api, agent.cli, agent.runtime or agent.security, and `registry` never imports it.

Modules, one noun each:

- `devroot`    — `DeviceRoot`, tolerant reads under the root; tree conventions.
- `cpu`        — `proc/cpuinfo` parsed; arch, vendor/model, cores, ISA features.
- `memory`     — total and available RAM from `proc/meminfo`.
- `board`      — device-tree model and `compatible`, DMI, the hypervisor.
- `pci`        — the PCI device list and PCI addresses, shared by GPUs and NPUs.
- `platform`   — SoC devices off PCI: platform devices, devfreq nodes, DRM cards, modules.
- `kernlog`    — a captured kernel log: driver messages and the firmware drivers loaded.
- `nvidia_smi` — nvidia-smi reports: run live, or parsed from a tree's captures.
- `gpu`        — GPUs: NVIDIA discrete and Jetson, AMD (APU iGPU or card), Intel, SoC GPUs
                 off PCI (Arm Mali, Qualcomm Adreno, ...), others.
- `npu`        — NPUs: Intel, AMD XDNA, Qualcomm Hexagon, Rockchip, Hailo, others by devfreq.
- `runtimes`   — llama.cpp / ONNX Runtime: probed live, or a tree's `runtimes.json`.
- `profile`    — `detect()` assembling the profile from the above, and `summary()`.
"""

from __future__ import annotations

from agent.hardware.devroot import DeviceRoot
from agent.hardware.nvidia_smi import NVIDIA_SMI_TEXT, NVIDIA_SMI_XML
from agent.hardware.profile import detect, summary
from agent.hardware.runtimes import RUNTIMES_JSON

__all__ = ["NVIDIA_SMI_TEXT", "NVIDIA_SMI_XML", "RUNTIMES_JSON", "DeviceRoot", "detect",
           "summary"]
