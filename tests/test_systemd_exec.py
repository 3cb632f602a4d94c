"""The daemon run exactly as systemd runs edge-agent.service behind edge-agent.socket, on a
machine where systemd is not PID 1: the socket bound and listening before the daemon
starts and handed over as fd 3 (LISTEN_FDS/LISTEN_PID), sd_notify to a datagram socket the
test reads, a watchdog, and the unit's sandbox that a process can apply to itself
(tests/systemd_exec.py: no capabilities, no new privileges, the system call filter,
MemoryDenyWriteExecute, the address families, the umask). Real llama.cpp and onnxruntime
inference runs under that filter."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from systemd_exec import exec_start, listen, parse_unit, seconds, values

from agent.settings import ServerSettings
from agent.sync.jobs import Jobs
from agent.sync.mqtt import MqttLink
from agent.sync.service import SyncService
from registry.service import open_registry

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"
SOCKET_UNIT = ROOT / "systemd" / "edge-agent.socket"
EXEC = Path(__file__).with_name("systemd_exec.py")
WATCHDOG_USEC = 400_000  # the unit says 30 s; a short one shows several pings quickly


class UnitProcess:
    """`edge-agent serve` started through systemd_exec.py under a temporary root."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.unit = parse_unit(UNIT.read_text())
        self.listener, self.socket_path = listen(SOCKET_UNIT, root)
        self.home = root / "var/lib/edge-agent"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(root / "notify"))
        self.notify.settimeout(90)
        self.messages: list[tuple[float, str]] = []
        argv = exec_start(self.unit)
        assert Path(argv[0]).name == "edge-agent"
        # The unit's command line, with this checkout's interpreter for its entry point.
        self.command = [sys.executable, "-m", "agent", *argv[1:]]
        extra = {
            # What the unit's User= gives it, and what the role's config says.
            "HOME": str(self.home),
            "EDGE_AGENT_HOME": str(self.home),
            "EDGE_AGENT_SOCKET": str(self.socket_path),
            "EDGE_AGENT_RUNTIME__THREADS": "2",
            "NOTIFY_SOCKET": str(root / "notify"),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            **(env or {}),
        }
        self.log = root / "daemon.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(EXEC), str(UNIT), "--", *self.command],
            pass_fds=[self.listener.fileno()], cwd=ROOT,
            env={"PATH": os.environ["PATH"], "EA_ROOT": str(root),
                 "EA_LISTEN_FD": str(self.listener.fileno()), "EA_EXTRA_ENV": json.dumps(extra)},
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )

    def wait_for(self, message: str, count: int = 1) -> list[float]:
        """Block on the notify socket until `message` has come `count` times; its times."""
        while sum(m == message for _, m in self.messages) < count:
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError as exc:
                raise AssertionError(f"no {message}: {self.log.read_text()[-3000:]}") from exc
            now = time.monotonic()
            self.messages += [(now, m) for m in data.split("\n")]
        return [t for t, m in self.messages if m == message]

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                            base_url="http://edge-agent", timeout=120)

    def status(self) -> dict[str, str]:
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()
        self.notify.close()


@pytest.fixture
def root() -> Iterator[Path]:
    # Socket paths are limited to ~100 bytes: a short private directory.
    path = Path(tempfile.mkdtemp(prefix="ea-unit-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_daemon_runs_as_the_units_would(root: Path) -> None:
    unit = UnitProcess(root)
    try:
        inode = unit.socket_path.stat().st_ino
        # An app connects before the daemon is ready: the socket exists, the kernel queues
        # the connection, and the daemon answers it once it has started.
        with unit.client() as c:
            early = c.get("/readyz")
        assert early.status_code == 200, early.text
        ready = unit.wait_for("READY=1")
        assert early.json() == {"status": "ready"}
        # Pings at half the interval, none late enough for systemd to act.
        pings = [t for t in unit.wait_for("WATCHDOG=1", count=4) if t >= ready[0]]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert gaps and max(gaps) < WATCHDOG_USEC / 1e6, gaps
        # Served on the inherited socket (same inode: nothing re-bound), with the caller's
        # kernel-verified identity, under the unit's sandbox.
        with unit.client() as c:
            whoami = c.get("/agent/v1/whoami").json()
            assert c.get("/agent/v1/loaded").status_code == 200
        assert whoami["uid"] == os.getuid()
        assert unit.socket_path.stat().st_ino == inode
        status = unit.status()
        assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 3
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
        assert status["Umask"] == "0027"
        unit.proc.send_signal(signal.SIGTERM)
        unit.wait_for("STOPPING=1")
        assert unit.proc.wait(60) == 0, unit.log.read_text()[-3000:]
        # The socket belongs to the socket unit: it stays for the next start.
        assert unit.socket_path.stat().st_ino == inode
    finally:
        unit.close()


def test_llama_cpp_and_onnxruntime_serve_under_the_units_filter(
    root: Path, smollm2_gguf: Path
) -> None:
    home = root / "var/lib/edge-agent"
    home.mkdir(parents=True, mode=0o750)
    reg = open_registry(home)
    try:
        reg.import_file(smollm2_gguf, alias="smollm2-135m")
        reg.pull("minilm-l6-v2")  # ONNX + tokenizer.json
    finally:
        reg.close()
    unit = UnitProcess(root)
    try:
        unit.wait_for("READY=1")
        with unit.client() as c:
            chat = c.post("/v1/chat/completions", json={
                "model": "smollm2-135m", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Name a colour."}]})
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] > 0
            emb = c.post("/v1/embeddings", json={"model": "minilm-l6-v2",
                                                 "input": ["a cat", "a kitten"]})
            assert emb.status_code == 200, emb.text
            assert [len(d["embedding"]) for d in emb.json()["data"]] == [384, 384]
        assert unit.status()["Seccomp"] == "2"
        unit.proc.send_signal(signal.SIGTERM)
        assert unit.proc.wait(60) == 0
    finally:
        unit.close()
    log = unit.log.read_text()
    assert "Traceback" not in log, log[-3000:]


PROBE = r"""
import ctypes, errno, mmap, os, socket
def refused(call):
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "allowed"
libc = ctypes.CDLL(None, use_errno=True)
def mount():
    if libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
out = {
    "nice": refused(lambda: os.nice(19)),
    "affinity": refused(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "inet": refused(lambda: socket.socket(socket.AF_INET6).close()),
    "netlink": refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
    "wx_mapping": refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "mount": refused(mount),
    "chown": refused(lambda: os.chown("/proc/self/cwd", 0, 0)),
}
print(__import__("json").dumps(out))
"""


def test_the_filter_allows_what_the_agent_needs_and_refuses_the_rest(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXEC), str(UNIT), "--", sys.executable, "-c", PROBE],
        env={"PATH": os.environ["PATH"], "EA_ROOT": str(root)},
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout) == {
        "nice": "allowed", "affinity": "allowed", "inet": "allowed",
        "netlink": "EAFNOSUPPORT", "wx_mapping": "EPERM", "mount": "EPERM", "chown": "EPERM",
    }


def _default(func: Callable[..., object], name: str) -> float:
    value = inspect.signature(func).parameters[name].default
    assert isinstance(value, float)
    return value


def test_the_stop_timeout_covers_the_agents_stop_path() -> None:
    """TimeoutStopSec must exceed the longest SIGTERM may take, as the code's defaults make it
    (agent.daemon, then agent.app.shutdown): the requests' grace period, then SyncService.stop
    (the jobs' grace, the outbox flush's grace for PUBACKs of batches in flight, the MQTT
    thread's join), then the model threads' grace period; with 5 s to spare."""
    unit = parse_unit(UNIT.read_text())
    (stop,) = values(unit, "Service", "TimeoutStopSec")
    grace = ServerSettings().shutdown_grace_seconds
    flush = _default(SyncService.stop, "grace")
    worst = (grace + _default(Jobs.stop, "grace") + flush + _default(MqttLink.stop, "timeout")
             + grace)
    assert seconds(stop) > worst + 5.0, (stop, worst)
    assert seconds(stop) > flush
    # The unit's comment states the same sum; it must not drift from the code.
    assert f": {worst:.0f} s." in UNIT.read_text(), worst
