"""nvidia-smi reports: run on the live system, or parsed from what a tree captured.

On the live system `nvidia-smi -q -x` runs when it is installed; under a tree the
captured XML (`NVIDIA_SMI_XML`) is read, else the plain table (`NVIDIA_SMI_TEXT`).
Either way the result is a `SmiReport`, or None when there is nothing usable.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from agent.hardware.devroot import CAPTURE_DIR, DeviceRoot
from agent.hardware.pci import normalize_pci_address

NVIDIA_SMI_XML = f"{CAPTURE_DIR}/nvidia-smi-q.xml"
NVIDIA_SMI_TEXT = f"{CAPTURE_DIR}/nvidia-smi.txt"
NVIDIA_SMI_TIMEOUT_S = 10.0

_MIB = re.compile(r"^\s*(\d+)\s*MiB\b")
_SMI_ROW = re.compile(r"^(\d+)\s+(.+?)\s+(?:On|Off|N/A)$")
_SMI_MEM = re.compile(r"(\d+)MiB\s*/\s*(\d+)MiB")


@dataclass(frozen=True)
class SmiGpu:
    bus: str | None
    name: str | None
    memory_bytes: int | None
    pci_id: str | None = None


@dataclass(frozen=True)
class SmiReport:
    """What nvidia-smi said: the driver, the CUDA version and one entry per GPU shown."""

    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[SmiGpu, ...]


def _parse_xml(text: str) -> ET.Element | None:
    try:
        defused = importlib.import_module("defusedxml.ElementTree")
    except ImportError:
        defused = None
    try:
        if defused is not None:
            parsed: ET.Element = defused.fromstring(text)
            return parsed
        # defusedxml is not a dependency. The input is the output of the local nvidia-smi
        # or a file the operator captured from it; expat (>= 2.4.1) refuses entity blow-ups
        # and never fetches the external DTD nvidia-smi names.
        return ET.fromstring(text)  # noqa: S314
    except Exception:  # ParseError, or defusedxml's refusals: malformed means absent
        return None


def _xml_text(el: ET.Element, path: str) -> str | None:
    found = el.find(path)
    value = (found.text or "").strip() if found is not None else ""
    return None if value in ("", "N/A") else value


def _mib(text: str | None) -> int | None:
    m = _MIB.match(text or "")
    return int(m.group(1)) * 1024 * 1024 if m else None


def parse_nvidia_smi_xml(text: str) -> SmiReport | None:
    """Parse `nvidia-smi -q -x`; None when it is not that document."""
    doc = _parse_xml(text)
    if doc is None or doc.tag != "nvidia_smi_log":
        return None
    gpus: list[SmiGpu] = []
    for g in doc.findall("gpu"):
        bus = normalize_pci_address(g.get("id") or _xml_text(g, "pci/pci_bus_id") or "")
        pci_id = None
        raw_id = _xml_text(g, "pci/pci_device_id") or ""
        if re.fullmatch(r"[0-9A-Fa-f]{8}", raw_id):  # DDDDVVVV: device, then vendor
            pci_id = f"{raw_id[4:]}:{raw_id[:4]}".lower()
        # Only the GPU's own fb_memory_usage; MIG instances carry their own below mig_devices.
        gpus.append(SmiGpu(bus, _xml_text(g, "product_name"),
                           _mib(_xml_text(g, "fb_memory_usage/total")), pci_id))
    return SmiReport(_xml_text(doc, "driver_version"), _xml_text(doc, "cuda_version"),
                     tuple(gpus))


def parse_nvidia_smi_table(text: str) -> SmiReport | None:
    """Parse the default `nvidia-smi` table; None when it has no header."""
    driver = re.search(r"Driver Version:\s*(\d[\w.]*)", text)
    cuda = re.search(r"CUDA Version:\s*(\d[\w.]*)", text)
    if driver is None and cuda is None:
        return None
    lines = text.splitlines()
    gpus: list[SmiGpu] = []
    for i, line in enumerate(lines):
        if "Processes:" in line:
            break
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 5 or (m := _SMI_ROW.match(cells[1])) is None:
            continue
        bus = normalize_pci_address(cells[2].split()[0]) if cells[2] else None
        memory = None
        if i + 1 < len(lines):
            below = lines[i + 1].split("|")
            if len(below) > 2 and (mm := _SMI_MEM.search(below[2])):
                memory = int(mm.group(2)) * 1024 * 1024
        gpus.append(SmiGpu(bus, m.group(2), memory))
    return SmiReport(driver.group(1) if driver else None, cuda.group(1) if cuda else None,
                     tuple(gpus))


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-q", "-x"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_smi_report(root: DeviceRoot) -> SmiReport | None:
    """Live: run nvidia-smi if installed. Tree: the captured XML, else the captured table."""
    if root.is_live:
        out = _run_nvidia_smi()
        return parse_nvidia_smi_xml(out) if out else None
    xml_text = root.read_text(NVIDIA_SMI_XML, limit=16 << 20)
    report = parse_nvidia_smi_xml(xml_text) if xml_text else None
    if report is None and (table := root.read_text(NVIDIA_SMI_TEXT)):
        report = parse_nvidia_smi_table(table)
    return report
