"""Runs the real daemon as a subprocess on a Unix socket, for end-to-end tests.

Readiness and shutdown are observed through sd_notify (a datagram socket the test owns
as NOTIFY_SOCKET), so tests wait on the daemon's own READY=1, never on sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from registry.service import open_registry


class Daemon:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        # Socket paths are limited to ~100 bytes: keep them in a short private dir.
        self.sockdir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
        self.socket = self.sockdir / "agent.sock"
        self.notify_path = self.sockdir / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(60)
        self.env = {
            **os.environ,
            "EDGE_AGENT_HOME": str(home),
            "EDGE_AGENT_SOCKET": str(self.socket),
            "NOTIFY_SOCKET": str(self.notify_path),
            "EDGE_AGENT_RUNTIME__THREADS": "2",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self._log_text = ""
        self.messages: list[str] = []

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve"],
            env=self.env,
            # A file, not a pipe: a pipe nobody reads fills at 64 KiB and then blocks every
            # thread of the daemon that logs.
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            text=True,
        )
        self.wait_for("READY=1")
        return self

    def wait_for(self, message: str, count: int = 1) -> None:
        """Block until the daemon has sent `message` `count` times over sd_notify."""
        while self.messages.count(message) < count:
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError as exc:
                raise AssertionError(f"daemon never sent {message}: {self.stderr()}") from exc
            self.messages.extend(data.split("\n"))

    @property
    def log(self) -> Path:
        return self.sockdir / "daemon.log"

    def stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return "(running)"
        if self.log.exists():
            return self.log.read_text()
        return self._log_text

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://edge-agent",
            timeout=timeout,
        )

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url="http://edge-agent/v1",
            api_key="unused",
            http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))),
            max_retries=0,
        )

    def metric(self, name: str, **labels: str) -> float:
        with self.client() as c:
            text = c.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Stuck: have it print its threads' stacks (faulthandler on SIGUSR1), then kill.
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(2)  # time to write the stacks
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise AssertionError(f"the daemon did not stop within {timeout}s:\n"
                                 f"{self.stderr()[-6000:]}") from None
        finally:
            self.notify.close()
            self._log_text = self.log.read_text() if self.log.exists() else ""
            shutil.rmtree(self.sockdir, ignore_errors=True)


@contextmanager
def running(home: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = Daemon(home, env).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def prepare_home(home: Path, models: dict[str, Path]) -> Path:
    """A state dir with these files imported under these aliases."""
    reg = open_registry(home)
    try:
        for alias, path in models.items():
            reg.import_file(path, alias=alias)
    finally:
        reg.close()
    return home


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            yield payload if payload == "[DONE]" else json.loads(payload)
