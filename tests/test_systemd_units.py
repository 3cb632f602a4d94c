"""The units as systemd itself reads them (the real systemd-analyze of this machine, no
systemd running needed): `verify` passes on the socket and the service, alone and with each
accelerator drop-in; `security --offline=true` rates the service at most 2.0; and the
hardening lines are pinned, so one that disappears fails here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_exec import parse_unit, values

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
DROPINS = sorted((UNITS / "edge-agent.service.d").glob("*.conf"))
# The unit's ExecStart names the installed venv; verify checks that the binary exists, so
# the copy points at this checkout's entry point instead (the only line changed).
AGENT = Path(sys.executable).with_name("edge-agent")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")

HARDENING = {
    "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "edge-agent",
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "DevicePolicy": "closed", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native", "UMask": "0027",
    "RemoveIPC": "yes", "PrivateMounts": "yes", "KeyringMode": "private",
    "StateDirectory": "edge-agent", "RuntimeDirectory": "edge-agent",
    "ConfigurationDirectory": "edge-agent", "SystemCallErrorNumber": "EPERM",
}
PRESENT = ["WatchdogSec", "TimeoutStopSec", "MemoryMax", "MemoryHigh", "TasksMax"]


@pytest.fixture
def unit_dir(tmp_path: Path) -> Iterator[Path]:
    text = (UNITS / "edge-agent.service").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    binary = line.removeprefix("ExecStart=").split()[0]
    (tmp_path / "edge-agent.service").write_text(text.replace(line, line.replace(binary,
                                                                                 str(AGENT))))
    shutil.copy(UNITS / "edge-agent.socket", tmp_path)
    (tmp_path / "edge-agent.service.d").mkdir()
    yield tmp_path


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], cwd=unit_dir, capture_output=True,
                          text=True, check=False,
                          env={"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{unit_dir}:"})


def exposure(unit_dir: Path) -> float:
    out = analyze(unit_dir, "security", "--offline=true", "--no-pager",
                  str(unit_dir / "edge-agent.service"))
    found = re.search(r"Overall exposure level for edge-agent\.service: ([\d.]+)", out.stdout)
    assert found, out.stdout + out.stderr
    return float(found.group(1))


def test_both_units_verify(unit_dir: Path) -> None:
    out = analyze(unit_dir, "verify", "--man=no", "./edge-agent.socket", "./edge-agent.service")
    # verify exits 0 on unknown keys and bad values; any line it prints is a finding.
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.parametrize("dropin", DROPINS, ids=[d.name for d in DROPINS])
def test_each_accelerator_drop_in_verifies(unit_dir: Path, dropin: Path) -> None:
    shutil.copy(dropin, unit_dir / "edge-agent.service.d")
    out = analyze(unit_dir, "verify", "--man=no", "./edge-agent.service")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    unit = parse_unit(dropin.read_text())
    allowed = values(unit, "Service", "DeviceAllow")
    assert allowed and values(unit, "Service", "DevicePolicy") == ["closed"]
    # Exactly device nodes, never all of /dev or a block device.
    assert all(re.fullmatch(r"(/dev/[\w-]+|char-[\w-]+) rw?", a) for a in allowed), allowed


def test_the_accelerator_drop_ins_cover_nvidia_drm_and_npus() -> None:
    text = {d.name: d.read_text() for d in DROPINS}
    assert {"60-nvidia.conf", "60-dri.conf", "60-accel.conf"} <= set(text)
    assert "char-nvidia-frontend" in text["60-nvidia.conf"]
    assert "char-drm" in text["60-dri.conf"] and "char-accel" in text["60-accel.conf"]


def test_the_service_is_rated_at_most_2(unit_dir: Path) -> None:
    assert exposure(unit_dir) <= 2.0


def test_no_hardening_line_disappears() -> None:
    unit = parse_unit((UNITS / "edge-agent.service").read_text())
    service = dict(unit["Service"])
    missing = {k: v for k, v in HARDENING.items() if service.get(k) != v}
    assert not missing, missing
    assert all(values(unit, "Service", k) for k in PRESENT)
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters[0] == "@system-service" and "~@privileged @resources" in filters
    sock = parse_unit((UNITS / "edge-agent.socket").read_text())
    socket = dict(sock["Socket"])
    assert {k: socket.get(k) for k in ("ListenStream", "SocketMode", "SocketGroup")} == {
        "ListenStream": "/run/edge-agent/agent.sock", "SocketMode": "0660",
        "SocketGroup": "edge-agent-clients"}
