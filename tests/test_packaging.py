"""The wheel is what goes on a device: built, installed into a fresh virtual environment
outside the source tree, it checks its packaged policy and serves with it."""

from __future__ import annotations

import os
import shutil
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with only the wheel installed; the locked dependencies come from this
    environment's site-packages through a path entry (not its .pth files: the editable
    install of the source tree must not leak in)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(work / "dist"), str(ROOT)], check=True, cwd=work)
    (wheel,) = (work / "dist").glob("edge_agent-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(purelib) / "_locked_deps.pth").write_text(
        "\n".join([*site.getsitepackages(), sysconfig.get_path("platlib")]) + "\n"
    )
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--quiet", str(wheel)], check=True, cwd=work)
    yield venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    outside = Path(tempfile.mkdtemp(prefix="ea-wheel-cwd-"))
    try:
        return subprocess.run([str(venv / "bin" / "edge-agent"), *args], cwd=outside, text=True,
                              capture_output=True, check=False)
    finally:
        shutil.rmtree(outside)


def test_the_wheel_carries_its_policies_and_runs_from_the_venv(installed: Path) -> None:
    py = installed / "bin" / "python"
    where = subprocess.run(
        [str(py), "-c", "import agent, localdb, policies; "
                        "print(agent.__file__); print(policies.packaged('rbac.yaml')); "
                        "print(localdb.head_revision())"],
        cwd="/", check=True, capture_output=True, text=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where[:2]), where
    assert not Path(where[0]).is_relative_to(ROOT)
    assert where[2]  # the migration scripts are in the wheel
    out = _run(installed, "policy", "check", where[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{where[1]}: ok (")


def test_the_installed_daemon_reaches_ready_with_the_default_policy(installed: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ea-wheel-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(60)
    env = {"PATH": os.environ.get("PATH", ""), "EDGE_AGENT_HOME": str(tmp / "home"),
           "EDGE_AGENT_SOCKET": str(tmp / "agent.sock"), "NOTIFY_SOCKET": str(tmp / "notify")}
    proc = subprocess.Popen([str(installed / "bin" / "edge-agent"), "serve"], env=env,
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        messages: list[str] = []
        while "READY=1" not in messages:
            try:
                messages += notify.recv(4096).decode().split("\n")
            except TimeoutError as exc:
                proc.kill()
                raise AssertionError(f"no READY=1: {proc.communicate()[1]}") from exc
        transport = httpx.HTTPTransport(uds=str(tmp / "agent.sock"))
        with httpx.Client(transport=transport, base_url="http://edge-agent") as c:
            assert c.get("/readyz").json() == {"status": "ready"}
            # The packaged policy is in force: root is its admin.
            assert c.get("/agent/v1/loaded").status_code == 200
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(tmp)
