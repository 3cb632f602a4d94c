"""The README's fleet walk-through, run as written (on a free port, in a temp dir): a
reader who pastes it gets a device online at the controller."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from fleet_env import free_port, scratch_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- fleet-walkthrough", 1)[1].split("```sh\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_fleet_walkthrough_works_as_written() -> None:
    script = walkthrough()
    assert "keys init" in script and "fleet status --wait" in script
    port = free_port()
    with scratch_dir("ea-readme-") as work:
        (work / ".venv").symlink_to(ROOT / ".venv")
        (work / "fleet").mkdir()
        # The one change: the port (8883 may be taken on this machine).
        body = script.replace("8883", str(port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env["EDGE_AGENT_SYNC__BROKER_PORT"] = str(port)
        env["EDGE_CONTROLLER_BROKER_PORT"] = str(port)
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out + _logs(work)
            device = subprocess.run([".venv/bin/edge-agent", "device", "id"], cwd=work,
                                    env={**env, "EDGE_AGENT_HOME": str(work / "fleet/device")},
                                    capture_output=True, text=True, check=True).stdout.strip()
            assert re.search(rf"^{device}\s+online\b", out, re.M), out
        finally:
            # The script's background jobs share its process group; mosquitto -d left it
            # (setsid), so it is found by its working directory.
            for pid in _started_in(work):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            shutil.rmtree(work / "fleet", ignore_errors=True)


def _logs(work: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()}" for p in (work / "fleet").glob("*.log"))


def _started_in(work: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == work:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
