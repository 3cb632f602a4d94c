"""Hardware detection against trees built from real captures, the live system and junk.

The trees under fixtures/hw/ come from `fixtures/hw/build_trees.py`; each holds only what
its capture shows, so an absent fact is asserted as unknown (0 / None / empty).
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import platform
import sys
import types
from pathlib import Path

import pytest

from agent.hardware import RUNTIMES_JSON, detect, summary
from registry.profile import HardwareProfile, NpuInfo

HW = Path(__file__).parent / "fixtures" / "hw"
# shared/ sits beside the checkout (as CI lays it out)
CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "hw-fixtures"
MiB, GiB = 2**20, 2**30


def tree(slug: str) -> HardwareProfile:
    return detect(HW / slug, probe_runtimes=False)


def write(root: Path, rel: str, data: str | bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    p.write_bytes(data)


def assert_no_cpu_facts(p: HardwareProfile) -> None:
    assert (p.cpu.arch, p.cpu.cores_logical, p.cpu.cores_physical) == ("unknown", 0, 0)
    assert p.cpu.features == ()
    # no meminfo: the RAM size is unknown, not 0 bytes (it was (0, 0) before memory
    # could say "unknown")
    assert (p.memory.total_bytes, p.memory.available_bytes) == (None, None)
    assert not p.memory.known


# --- Raspberry Pi 5 ----------------------------------------------------------------


def test_raspberry_pi_5_from_its_own_cpuinfo_and_meminfo() -> None:
    p = tree("raspberry-pi-5")
    assert p.cpu.arch == "aarch64"
    assert (p.cpu.vendor, p.cpu.model) == ("ARM", "Cortex-A76")
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (4, 4)
    assert {"neon", "dotprod", "fp16"} <= set(p.cpu.features)
    assert not {"i8mm", "sve", "bf16"} & set(p.cpu.features)
    assert p.board == "Raspberry Pi 5 Model B Rev 1.0"  # cpuinfo's Model line; no DT capture
    assert p.memory.total_bytes == 8252368 * 1024
    assert p.memory.available_bytes == 6126208 * 1024
    assert p.gpus == () and p.npus == () and p.hypervisor is None


def test_raspberry_pi_5_sbcbench() -> None:
    p = tree("raspberry-pi-5-sbcbench")
    assert p.compatible == ("raspberrypi,5-model-b", "brcm,bcm2712")
    assert (p.cpu.model, p.cpu.cores_logical) == ("Cortex-A76", 4)
    assert "dotprod" in p.cpu.features
    assert p.memory.total_bytes == 15 * GiB  # free -h said "15Gi"; exact only to that
    assert p.board is None and p.gpus == () and p.npus == ()


def test_raspberry_pi_5_compatible_as_printed_is_split_at_vendors() -> None:
    p = tree("raspberry-pi-5-dt-compatible-retropie-3823")
    assert p.compatible == ("raspberrypi,5-model-b", "brcm,bcm2712")
    assert_no_cpu_facts(p)


# --- Jetson Orin -------------------------------------------------------------------


def test_jetson_orin_nano_super_jp6() -> None:
    p = tree("jetson-orin-nano-super-jp6")
    assert p.cpu.arch == "aarch64"
    assert (p.cpu.model, p.cpu.cores_physical, p.cpu.cores_logical) == ("Cortex-A78AE", 6, 6)
    assert "dotprod" in p.cpu.features and "i8mm" not in p.cpu.features
    assert "nvidia,tegra234" in p.compatible
    gpu = p.gpu("nvidia")
    assert gpu is not None and gpu.integrated and "Orin" in gpu.name
    assert gpu.memory_bytes is None and gpu.pci_id is None
    assert p.board == "NVIDIA AAEON BOXER-8654AI_RefKit` platform"  # DMI, verbatim
    assert abs(p.memory.total_bytes - 7.4 * GiB) < 0.05 * GiB


def test_jetson_agx_orin_compatible() -> None:
    p = tree("jetson-agx-orin-64gb-dt-compatible-jetson-gpio-125")
    assert p.compatible == ("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005",
                            "nvidia,tegra234", "nvidia,tegra23x")
    gpu = p.gpu("nvidia")
    assert gpu is not None and gpu.integrated and gpu.driver is None  # no driver evidence


def test_jetson_orin_nano_devkit_nvidia_smi() -> None:
    p = tree("jetson-orin-nano-devkit-8gb")
    (gpu,) = p.gpus
    assert (gpu.vendor, gpu.name, gpu.integrated) == ("nvidia", "Orin (nvgpu)", True)
    assert (gpu.driver, gpu.driver_version, gpu.compute_api_version) == ("nvgpu", "540.5.0", "12.6")
    assert gpu.memory_bytes is None  # "Not Supported": it shares system RAM
    assert_no_cpu_facts(p)


def test_jetson_orin_nx_model_only() -> None:
    p = tree("jetson-orin-nx-devkit-dt-model-ultralytics-9876")
    assert p.board == "NVIDIA Orin NX Developer Kit"
    assert p.gpus == ()  # only the model string was captured; names are not guessed from
    assert p.compatible == ()


# --- Intel Core Ultra / AMD Ryzen AI -----------------------------------------------


def test_intel_core_ultra_npu_passthrough() -> None:
    p = tree("intel-core-ultra-9-185h-npu-passthrough-vm")
    npu = p.npu("intel-npu")
    assert npu is not None
    assert (npu.name, npu.driver, npu.device_node) == (
        "Intel NPU (Meteor Lake)", "intel_vpu", "/dev/accel/accel0")
    assert p.cpu.arch == "x86_64" and p.cpu.cores_logical == 0


def test_intel_meteor_lake_npu_from_dmesg_only() -> None:
    npu = tree("intel-meteor-lake-npu-linux-npu-driver-15").npu("intel-npu")
    assert npu is not None and npu.device_node == "/dev/accel/accel0"
    # No PCI device ID in the capture, but the driver's own line names the firmware it
    # loaded (intel/vpu/vpu_37xx_v0.0.bin): the generation is 37xx. (This was "Intel NPU"
    # while the generation came only from the PCI ID table.)
    assert npu.name == "Intel NPU 37xx (Meteor Lake / Arrow Lake)"
    assert npu.generation == "37xx" and npu.pci_address == "0000:00:0b.0"
    assert any("vpu_37xx_v0.0.bin" in e for e in npu.evidence)


def test_intel_arrow_lake_npu() -> None:
    p = tree("intel-core-ultra-7-255hx-arrow-lake-npu")
    npu = p.npu("intel-npu")
    assert npu is not None and npu.online and npu.driver == "intel_vpu"
    assert p.gpus == ()


def test_intel_core_ultra_9_cpu() -> None:
    p = tree("intel-core-ultra-9-185h-geekom-gt1")
    assert (p.cpu.arch, p.cpu.vendor) == ("x86_64", "GenuineIntel")
    assert p.cpu.model == "Intel(R) Core(TM) Ultra 9 185H"
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (16, 22)
    assert {"avx2", "avx_vnni", "fma", "f16c"} <= set(p.cpu.features)
    assert not any(f.startswith("avx512") for f in p.cpu.features)
    assert p.board == "GEEKOM GT1 Mega"
    assert p.memory.total_bytes == 30 * GiB and p.memory.available_bytes == 28 * GiB
    assert p.npus == ()  # this run captured no NPU evidence
    assert p.gpus == ()  # the iGPU appears only in sbc-bench's summary, with no PCI address


def test_amd_ryzen_ai_xdna() -> None:
    p = tree("amd-ryzen-ai-350-framework13-xdna2")
    npu = p.npu("amd-xdna")
    assert npu is not None
    assert (npu.driver, npu.device_node) == ("amdxdna", "/dev/accel/accel0")
    assert "XDNA 2" in npu.name


def test_ryzen_ai_max_cpu() -> None:
    p = tree("ryzen-ai-max-395-framework-desktop")
    assert p.cpu.vendor == "AuthenticAMD"
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (16, 32)
    assert {"avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512bw", "avx512vl"} <= set(
        p.cpu.features)
    assert p.board == "Framework Desktop (AMD Ryzen AI Max 300 Series)"
    assert p.npus == ()  # no lspci/dmesg in this run


# --- Rockchip RK3588 ---------------------------------------------------------------


def test_rk3588_orangepi_5_max() -> None:
    p = tree("rk3588-orangepi-5-max")
    assert p.cpu.model == "4x Cortex-A55 + 4x Cortex-A76"
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (8, 8)
    assert "rockchip,rk3588" in p.compatible
    npu = p.npu("rockchip-rknpu")
    assert npu is not None and npu.driver == "rknpu"


def test_rk3588_rknpu_version() -> None:
    npu = tree("rk3588-radxa-rock-5b-rknpu-version").npu("rockchip-rknpu")
    assert npu is not None and npu.detail == "driver v0.9.6"


def test_rk3588_rknpu_behind_drm() -> None:
    npu = tree("rk3588-rknpu-dmesg-ezrknn-toolkit2-1").npu("rockchip-rknpu")
    assert npu is not None and npu.device_node == "/dev/dri/card1"


def test_rk3588_soc_without_driver_is_offline(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/compatible", b"radxa,rock-5b\x00rockchip,rk3588\x00")
    p = detect(tmp_path, probe_runtimes=False)
    (npu,) = p.npus
    assert npu.kind == "rockchip-rknpu" and not npu.online and npu.detail
    assert p.npu("rockchip-rknpu") is None


# --- x86 servers with NVIDIA -------------------------------------------------------


def test_l40s_server() -> None:
    p = tree("x86-xeon-8562y-l40s-server")
    assert len(p.gpus) == 4
    for g in p.gpus:
        assert (g.vendor, g.name, g.integrated) == ("nvidia", "NVIDIA L40S", False)
        assert g.memory_bytes == 46068 * MiB
        assert (g.driver, g.driver_version) == ("nvidia", "580.119.02")
        assert g.compute_api_version == "13.0"
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (64, 128)
    assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"} <= set(p.cpu.features)
    assert p.memory.total_bytes is None  # no meminfo capture: unknown, not 0


def test_a100_mig_server_from_xml() -> None:
    p = tree("nvidia-a100-sxm4-80gb-mig-server")
    (gpu,) = p.gpus  # attached_gpus says 4; the capture describes one
    assert gpu.name == "NVIDIA A100-SXM4-80GB"
    assert gpu.memory_bytes == 81920 * MiB  # the GPU's, not a MIG slice's 19968 MiB
    assert (gpu.driver_version, gpu.compute_api_version) == ("535.54.03", "12.2")
    assert gpu.pci_id == "10de:20b2" and not gpu.integrated


# --- Qualcomm ----------------------------------------------------------------------


def test_snapdragon_x_elite() -> None:
    p = tree("snapdragon-x-elite-devkit")
    assert (p.cpu.arch, p.cpu.vendor, p.cpu.model) == ("aarch64", "Qualcomm", "Oryon-X1")
    assert p.cpu.cores_logical == 12
    assert {"neon", "dotprod", "i8mm", "bf16", "fp16"} <= set(p.cpu.features)
    assert "sve" not in p.cpu.features
    assert p.board == "Qualcomm Snapdragon-Devkit"
    assert p.npus == ()  # no fastrpc or remoteproc listing in this run


def test_qcs8300_cdsp_offline_is_present_but_not_online() -> None:
    p = tree("qualcomm-qcs8300-ride-sx-cdsp-offline")
    (npu,) = p.npus  # the running remoteproc has no name, so it is not taken for a DSP
    assert npu.kind == "qualcomm-hexagon" and npu.online is False
    assert npu.detail is not None and "offline" in npu.detail
    assert p.npu("qualcomm-hexagon") is None


def test_hexagon_running_with_fastrpc(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/remoteproc/remoteproc1/name", "cdsp\n")
    write(tmp_path, "sys/class/remoteproc/remoteproc1/state", "running\n")
    write(tmp_path, "dev/fastrpc-cdsp", b"")
    npu = detect(tmp_path, probe_runtimes=False).npu("qualcomm-hexagon")
    assert npu is not None and npu.device_node == "/dev/fastrpc-cdsp"


# --- virtual machines --------------------------------------------------------------


def test_vmware_vm() -> None:
    p = tree("x86-xeon-gold-6326-vmware-vm")
    assert p.hypervisor is not None  # the hypervisor flag; the vendor is not in the capture
    assert p.gpus == () and p.npus == ()
    assert (p.cpu.cores_physical, p.cpu.cores_logical) == (8, 8)  # 8 sockets of 1 core
    assert {"avx512f", "avx512_vnni"} <= set(p.cpu.features)
    assert "avx512_bf16" not in p.cpu.features


def test_dmi_names_the_hypervisor(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "VMware, Inc.\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "VMware7,1\n")
    assert detect(tmp_path, probe_runtimes=False).hypervisor == "VMware"


# --- PCI conventions (synthetic trees, not captures) --------------------------------


def test_driver_may_be_a_symlink_or_a_plain_file(tmp_path: Path) -> None:
    igpu = "sys/bus/pci/devices/0000:00:02.0"
    write(tmp_path, f"{igpu}/vendor", "0x8086\n")
    write(tmp_path, f"{igpu}/device", "0x7d55\n")
    write(tmp_path, f"{igpu}/class", "0x030000\n")
    (tmp_path / "sys/bus/pci/drivers/i915").mkdir(parents=True)
    (tmp_path / igpu / "driver").symlink_to("../../../../bus/pci/drivers/i915")
    dgpu = "sys/bus/pci/devices/0000:03:00.0"
    write(tmp_path, f"{dgpu}/vendor", "0x1002\n")
    write(tmp_path, f"{dgpu}/device", "0x744c\n")
    write(tmp_path, f"{dgpu}/class", "0x030000\n")
    write(tmp_path, f"{dgpu}/driver", "amdgpu\n")
    write(tmp_path, f"{dgpu}/mem_info_vram_total", "25753026560\n")
    bmc = "sys/bus/pci/devices/0000:05:00.0"
    write(tmp_path, f"{bmc}/vendor", "0x1a03\n")
    write(tmp_path, f"{bmc}/class", "0x030000\n")
    p = detect(tmp_path, probe_runtimes=False)
    intel, amd = p.gpu("intel"), p.gpu("amd")
    assert intel is not None and (intel.driver, intel.integrated) == ("i915", True)
    assert intel.pci_id == "8086:7d55"
    assert amd is not None and (amd.driver, amd.memory_bytes) == ("amdgpu", 25753026560)
    assert len(p.gpus) == 2  # the BMC's VGA port is not a GPU


def test_hailo_and_unbound_npu(tmp_path: Path) -> None:
    write(tmp_path, "sys/bus/pci/devices/0000:01:00.0/vendor", "0x1e60\n")
    write(tmp_path, "sys/bus/pci/devices/0000:01:00.0/device", "0x2864\n")
    write(tmp_path, "sys/bus/pci/devices/0000:01:00.0/driver", "hailo\n")
    write(tmp_path, "dev/hailo0", b"")
    write(tmp_path, "sys/bus/pci/devices/0000:00:0b.0/vendor", "0x8086\n")
    write(tmp_path, "sys/bus/pci/devices/0000:00:0b.0/device", "0x643e\n")
    p = detect(tmp_path, probe_runtimes=False)
    hailo = p.npu("hailo")
    assert hailo is not None and hailo.device_node == "/dev/hailo0"
    (intel,) = (n for n in p.npus if n.kind == "intel-npu")
    assert not intel.online and intel.detail and "no driver" in intel.detail


# --- AMD APU iGPUs (public captures: LACT sysfs snapshots) --------------------------


def test_amd_radeon_780m_is_integrated_by_its_carve_out() -> None:
    (gpu,) = tree("amd-radeon-780m-phoenix-lact").gpus
    assert (gpu.vendor, gpu.integrated, gpu.driver) == ("amd", True, "amdgpu")
    assert (gpu.pci_id, gpu.pci_address) == ("1002:15bf", "0000:64:00.0")
    assert gpu.memory_bytes == 4 * GiB  # the firmware's carve-out, not VRAM of its own
    # 4 GiB "VRAM", all of it CPU-visible, and 29.3 GiB of GTT: the carve-out rule
    assert gpu.confidence == "medium"
    assert any("carve-out" in e for e in gpu.evidence)


def test_amd_radeon_890m_is_integrated_by_its_carve_out() -> None:
    (gpu,) = tree("amd-radeon-890m-strix-point-lact").gpus
    assert (gpu.vendor, gpu.integrated, gpu.pci_address) == ("amd", True, "0000:c1:00.0")
    assert gpu.memory_bytes == 512 * MiB and gpu.confidence == "medium"


def test_amd_discrete_card_stays_discrete() -> None:
    (gpu,) = tree("amd-radeon-rx-6900-xt-lact").gpus
    assert (gpu.vendor, gpu.integrated, gpu.pci_id) == ("amd", False, "1002:73bf")
    assert gpu.memory_bytes == 17163091968 and gpu.confidence == "high"
    assert any("mem_info_vram_vendor: samsung" in e for e in gpu.evidence)


def _amd_gpu(root: Path, addr: str, device: str, **attrs: str) -> None:
    base = f"sys/bus/pci/devices/{addr}"
    for name, value in {"vendor": "0x1002", "device": device, "class": "0x030000",
                        "driver": "amdgpu", **attrs}.items():
        write(root, f"{base}/{name}", value + "\n")


def test_amd_gpu_on_a_bus_with_soc_functions_is_integrated(tmp_path: Path) -> None:
    # An APU's iGPU shares its PCI bus with SoC functions of AMD's CPU vendor ID 0x1022
    # (PSP/crypto, USB, audio coprocessor); a discrete card's bus holds only its own.
    _amd_gpu(tmp_path, "0000:c4:00.0", "0x15bf")
    write(tmp_path, "sys/bus/pci/devices/0000:c4:00.2/vendor", "0x1022\n")
    write(tmp_path, "sys/bus/pci/devices/0000:c4:00.2/class", "0x108000\n")
    _amd_gpu(tmp_path, "0000:03:00.0", "0x7480", mem_info_vram_total=str(8 * GiB))
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
          "model name\t: AMD Ryzen 7 7840HS w/ Radeon 780M Graphics\n\n")
    p = detect(tmp_path, probe_runtimes=False)
    igpu, dgpu = sorted(p.gpus, key=lambda g: g.integrated, reverse=True)
    assert igpu.integrated and igpu.confidence == "high"
    assert igpu.name == "AMD Radeon 780M Graphics (1002:15bf)"
    assert "0000:c4:00.2" in igpu.evidence[1]
    assert not dgpu.integrated and dgpu.memory_bytes == 8 * GiB


def test_amd_gpu_named_only_by_the_cpu_is_integrated_with_low_confidence(tmp_path: Path) -> None:
    _amd_gpu(tmp_path, "0000:04:00.0", "0x163f")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
          "model name\t: AMD Custom APU 0405 w/ Radeon Graphics\n\n")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert gpu.integrated and gpu.confidence == "low"
    _amd_gpu(tmp_path, "0000:04:00.0", "0x163f", mem_info_vram_vendor="hynix")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert not gpu.integrated  # a sign of a discrete card wins over the CPU's name


# --- SoC GPUs off PCI ----------------------------------------------------------------


def test_mali_known_by_devfreq_and_kbase_attribute() -> None:
    p = tree("rk3588-radxa-rock-5b-sbcbench-4qJr")
    (gpu,) = p.gpus
    assert (gpu.vendor, gpu.integrated, gpu.pci_address) == ("arm", True, None)
    assert gpu.name == "Arm Mali GPU (fb000000.gpu)" and gpu.confidence == "medium"
    assert any(e.startswith("sys/class/devfreq/fb000000.gpu") for e in gpu.evidence)


def test_mali_with_its_driver_bound() -> None:
    (gpu,) = tree("rk3588-orangepi-5-max").gpus
    assert (gpu.vendor, gpu.driver, gpu.integrated, gpu.confidence) == (
        "arm", "mali", True, "high")


def test_adreno_known_by_devfreq_on_a_qualcomm_soc() -> None:
    for slug in ("qualcomm-qcs6490-radxa-dragon-q6a-sbcbench-KBw_", "snapdragon-x-elite-devkit"):
        (gpu,) = tree(slug).gpus  # the UFS controller's devfreq node is not a GPU
        assert (gpu.vendor, gpu.integrated) == ("qualcomm", True), slug
        assert gpu.name == "Qualcomm Adreno GPU (3d00000.gpu)" and gpu.confidence == "medium"


def test_gpu_known_only_from_its_loaded_module() -> None:
    (gpu,) = tree("rk3588-radxa-rock-5b-void-panthor-module").gpus
    assert (gpu.vendor, gpu.driver, gpu.integrated) == ("arm", "panthor", True)
    assert gpu.confidence == "low" and "sys/module/panthor/refcnt" in gpu.evidence[0]


def test_platform_gpu_seen_several_ways_is_one_gpu(tmp_path: Path) -> None:
    dev = "sys/bus/platform/devices/fb000000.gpu"
    write(tmp_path, f"{dev}/driver", "panthor\n")
    write(tmp_path, f"{dev}/of_node/compatible",
          b"rockchip,rk3588-mali\x00arm,mali-valhall-csf\x00")
    write(tmp_path, "sys/class/drm/card0/device", "fb000000.gpu\n")
    write(tmp_path, "sys/class/devfreq/fb000000.gpu/governor", "simple_ondemand\n")
    write(tmp_path, "sys/module/panthor/initstate", "live\n")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert (gpu.vendor, gpu.driver, gpu.confidence) == ("arm", "panthor", "high")
    assert gpu.name == "Arm Mali GPU (arm,mali-valhall-csf)"


def test_adreno_by_compatible_without_a_driver(tmp_path: Path) -> None:
    write(tmp_path, "sys/bus/platform/devices/3d00000.gpu/modalias",
          "of:NgpuT(null)Cqcom,adreno-635.0Cqcom,adreno\n")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert (gpu.vendor, gpu.driver, gpu.confidence) == ("qualcomm", None, "medium")


def test_pci_gpu_driver_module_without_a_pci_list(tmp_path: Path) -> None:
    write(tmp_path, "proc/modules", "amdgpu 15044608 0 - Live 0x0000000000000000\n")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert (gpu.vendor, gpu.integrated, gpu.confidence) == ("amd", False, "low")
    assert gpu.evidence[0].startswith("proc/modules: the amdgpu module is loaded")


def test_builtin_gpu_driver_is_not_a_loaded_module(tmp_path: Path) -> None:
    # built-in code with parameters shows in sys/module without initstate or refcnt
    (tmp_path / "sys/module/panfrost/parameters").mkdir(parents=True)
    assert detect(tmp_path, probe_runtimes=False).gpus == ()


def test_jetson_gpu_devfreq_is_not_a_second_gpu(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/compatible", b"nvidia,p3768-0000\x00nvidia,tegra234\x00")
    write(tmp_path, "sys/class/devfreq/17000000.gpu/governor", "nvhost_podgov\n")
    (gpu,) = detect(tmp_path, probe_runtimes=False).gpus
    assert gpu.vendor == "nvidia" and gpu.integrated


# --- NPUs: devfreq only, generation from firmware ------------------------------------


def test_npu_known_only_through_devfreq_is_present_with_state_unknown() -> None:
    p = tree("rk3588-radxa-rock-5b-sbcbench-4qJr")
    (npu,) = p.npus
    assert (npu.kind, npu.state, npu.online) == ("rockchip-rknpu", "unknown", False)
    assert npu.detail is not None and "devfreq node fdab0000.npu" in npu.detail
    assert "no driver bound" not in npu.detail  # it is not reported offline
    assert npu.confidence == "medium"
    assert any("rknpu_ondemand" in e for e in npu.evidence)
    assert p.npu("rockchip-rknpu") is None  # not offered to selection
    assert "state unknown" in summary(p)


def test_npu_of_another_kind_known_by_devfreq(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/compatible", b"allwinner,sun60iw2\x00")
    write(tmp_path, "sys/class/devfreq/3600000.npu/governor", "performance\n")
    (npu,) = detect(tmp_path, probe_runtimes=False).npus
    assert (npu.kind, npu.state, npu.confidence) == ("other", "unknown", "low")


def test_intel_npu_generation_from_the_firmware_it_loaded() -> None:
    npu = tree("intel-core-ultra-7-255hx-arrow-lake-npu").npu("intel-npu")
    assert npu is not None and npu.generation == "37xx"  # no device ID: the firmware says
    vm = tree("intel-core-ultra-9-185h-npu-passthrough-vm").npu("intel-npu")
    assert vm is not None and (vm.generation, vm.name) == ("37xx", "Intel NPU (Meteor Lake)")


def test_npu_generation_from_installed_firmware_only_when_unambiguous(tmp_path: Path) -> None:
    write(tmp_path, "sys/bus/pci/devices/0000:00:0b.0/driver", "intel_vpu\n")
    write(tmp_path, "dev/accel/accel0", b"")
    write(tmp_path, "lib/firmware/intel/vpu/vpu_40xx_v0.0.bin", b"")
    npu = detect(tmp_path, probe_runtimes=False).npu("intel-npu")
    assert npu is not None and npu.generation == "40xx"
    write(tmp_path, "lib/firmware/intel/vpu/vpu_37xx_v0.0.bin", b"")  # linux-firmware: all
    npu = detect(tmp_path, probe_runtimes=False).npu("intel-npu")
    assert npu is not None and npu.generation is None


def test_xdna_generation_from_its_firmware_directory(tmp_path: Path) -> None:
    write(tmp_path, "sys/module/amdxdna/initstate", "live\n")
    write(tmp_path, "dev/accel/accel0", b"")
    write(tmp_path, "var/lib/edge-agent/capture/dmesg.txt",
          "[    3.1] amdxdna 0000:c5:00.1: loaded firmware amdnpu/1502_00/npu.sbin\n")
    npu = detect(tmp_path, probe_runtimes=False).npu("amd-xdna")
    assert npu is not None and (npu.generation, npu.confidence) == ("XDNA", "low")


def test_npu_state_and_online_agree() -> None:
    assert NpuInfo(kind="other", name="x", state="unknown").online is False
    assert NpuInfo(kind="hailo", name="x", online=False).state == "offline"
    assert NpuInfo(kind="hailo", name="x").state == "online"
    with pytest.raises(ValueError, match="contradicts"):
        NpuInfo(kind="hailo", name="x", online=True, state="offline")


# --- evidence in device info ---------------------------------------------------------


def test_evidence_confidence_and_pci_address_are_in_the_json() -> None:
    data = json.loads(tree("x86-xeon-8562y-l40s-server").model_dump_json())
    gpu = data["gpus"][0]
    assert gpu["pci_address"] == "0000:4a:00.0" and gpu["confidence"] == "high"
    assert gpu["evidence"][0].startswith("proc/driver/nvidia/gpus/0000:4a:00.0/information")
    npu = json.loads(tree("amd-ryzen-ai-350-framework13-xdna2").model_dump_json())["npus"][0]
    assert (npu["pci_address"], npu["generation"], npu["state"]) == (
        "0000:c2:00.1", "XDNA 2", "online")
    assert data["memory"] == {"total_bytes": None, "available_bytes": None}


def test_device_info_prints_evidence(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    slug = HW / "amd-radeon-780m-phoenix-lact"
    out = CliRunner().invoke(main, ["device", "info", "--root", str(slug)])
    assert out.exit_code == 0, out.output
    assert "medium confidence: sys/bus/pci/devices/0000:64:00.0" in out.output
    assert "Memory:      unknown" in out.output
    out = CliRunner().invoke(main, ["device", "info", "--root", str(slug), "--json"])
    assert json.loads(out.output)["gpus"][0]["pci_address"] == "0000:64:00.0"


# --- live system, empty and junk trees ---------------------------------------------


def test_live_system() -> None:
    p = detect(probe_runtimes=False)
    assert p.cpu.arch == platform.machine()
    assert p.cpu.cores_logical >= 1 and p.cpu.cores_physical >= 1
    assert p.cpu.cores_physical <= p.cpu.cores_logical
    assert p.memory.total_bytes > 0
    assert 0 < p.memory.available_bytes <= p.memory.total_bytes
    assert summary(p)


def test_empty_tree(tmp_path: Path) -> None:
    p = detect(tmp_path)
    assert_no_cpu_facts(p)
    assert p.gpus == () and p.npus == () and p.compatible == ()
    assert p.board is None and p.hypervisor is None
    assert p.runtimes.llama_cpp_version is None and p.runtimes.onnx_providers == ()
    assert "unknown" in summary(p)


def test_missing_root_is_an_empty_tree(tmp_path: Path) -> None:
    assert_no_cpu_facts(detect(tmp_path / "nope"))


def test_junk_files_do_not_crash(tmp_path: Path) -> None:
    junk = bytes(range(256)) * 64
    for rel in ("proc/cpuinfo", "proc/meminfo", "proc/device-tree/compatible",
                "proc/device-tree/model", "proc/driver/nvidia/version",
                "sys/bus/pci/devices/0000:00:02.0/vendor", "sys/bus/pci/devices/0000:00:02.0/class",
                "sys/class/remoteproc/remoteproc0/name", "sys/kernel/debug/rknpu/version",
                "sys/class/dmi/id/sys_vendor", "sys/devices/system/cpu/online",
                "var/lib/edge-agent/capture/nvidia-smi-q.xml",
                "var/lib/edge-agent/capture/nvidia-smi.txt", RUNTIMES_JSON):
        write(tmp_path, rel, junk)
    (tmp_path / "sys/bus/pci/devices/0000:00:02.0/driver").mkdir()  # a dir, not a link
    (tmp_path / "sys/bus/pci/devices/not-an-address").mkdir()
    (tmp_path / "proc/driver/nvidia/gpus/0000:01:00.0/information").mkdir(parents=True)
    p = detect(tmp_path)
    assert p.cpu.cores_logical == 0 and p.memory.total_bytes is None
    assert summary(p)


def test_half_valid_lines_are_skipped(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", "MemTotal: lots kB\nMemTotal:  2048 kB\nMemAvailable: -1 kB\n")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nflags\t\t: avx2 lm\n\nprocessor : x\nnoise\n")
    p = detect(tmp_path, probe_runtimes=False)
    assert p.memory.total_bytes == 2048 * 1024
    assert p.memory.available_bytes is None  # no MemAvailable, nothing to estimate it from
    assert (p.cpu.arch, p.cpu.cores_logical, p.cpu.features) == ("x86_64", 1, ("avx2",))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_a_file_does_not_block(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    os.mkfifo(tmp_path / "proc/cpuinfo")
    assert detect(tmp_path, probe_runtimes=False).cpu.cores_logical == 0


# --- runtimes ----------------------------------------------------------------------


def _fake_runtimes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-ins for llama_cpp and onnxruntime; returns the list their calls append to."""
    calls: list[str] = []

    def offload() -> bool:
        calls.append("llama_supports_gpu_offload")
        return True

    def providers() -> list[str]:
        calls.append("get_available_providers")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    llama = types.ModuleType("llama_cpp")
    llama.__version__ = "9.9.9"
    llama.llama_supports_gpu_offload = offload
    llama.llama_print_system_info = lambda: b"CUDA : ARCHS = 890 | CPU : SSE3 = 1 | AVX = 1 |"
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.99.0"
    ort.get_available_providers = providers
    monkeypatch.setitem(sys.modules, "llama_cpp", llama)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    return calls


def test_live_runtime_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_runtimes(monkeypatch)
    rt = detect(Path("/"), probe_runtimes=True).runtimes
    assert (rt.llama_cpp_version, rt.llama_gpu_offload) == ("9.9.9", True)
    assert rt.llama_backends == ("cuda",)
    assert rt.onnxruntime_version == "1.99.0"
    assert rt.onnx_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert detect(Path("/"), probe_runtimes=False).runtimes.llama_cpp_version is None


def test_missing_runtime_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rt = detect(Path("/"), probe_runtimes=True).runtimes
    assert rt.llama_cpp_version is None and rt.onnxruntime_version is None


def test_tree_never_probes_the_live_runtimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_runtimes(monkeypatch)
    assert detect(HW / "raspberry-pi-5", probe_runtimes=True).runtimes.llama_cpp_version is None
    write(tmp_path, RUNTIMES_JSON, '{"llama_cpp_version": "0.3.2", "onnx_providers": ["X"]}')
    rt = detect(tmp_path, probe_runtimes=True).runtimes
    assert (rt.llama_cpp_version, rt.onnx_providers) == ("0.3.2", ("X",))
    assert calls == []


# --- summary and fixture provenance ------------------------------------------------


def test_summary_lines() -> None:
    text = summary(tree("x86-xeon-8562y-l40s-server"))
    assert text.count("NVIDIA L40S") == 4 and "580.119.02" in text and "CUDA 13.0" in text
    assert "OFFLINE" in summary(tree("qualcomm-qcs8300-ride-sx-cdsp-offline"))
    assert "Raspberry Pi 5 Model B Rev 1.0" in summary(tree("raspberry-pi-5"))


@pytest.mark.skipif(not CAPTURES.is_dir(), reason="raw captures not available here")
def test_fixture_trees_match_their_generator(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_trees", HW / "build_trees.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    slugs = module.build(CAPTURES, tmp_path) + module.build_public(HW / "public", tmp_path)
    assert sorted(slugs) == sorted(d.name for d in HW.iterdir() if d.is_dir()
                                   and d.name not in ("__pycache__", "public"))
    for slug in slugs:
        _assert_same_tree(tmp_path / slug, HW / slug)


def test_public_fixture_trees_match_their_generator(tmp_path: Path) -> None:
    """The trees from public/ need no shared captures: checked everywhere."""
    spec = importlib.util.spec_from_file_location("build_trees", HW / "build_trees.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    slugs = module.build_public(HW / "public", tmp_path)
    sources = (HW / "public" / "SOURCES.md").read_text()
    for slug in slugs:
        assert f"`{slug}/`" in sources, f"{slug} has no entry in public/SOURCES.md"
        _assert_same_tree(tmp_path / slug, HW / slug)


def _assert_same_tree(a: Path, b: Path) -> None:
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), (
        a.name, cmp.left_only, cmp.right_only, cmp.diff_files)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (a, mismatch, errors)
    for sub in cmp.common_dirs:
        _assert_same_tree(a / sub, b / sub)
