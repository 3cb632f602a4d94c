"""Real fleet infrastructure for tests: the fleet's keys (controller.pki), a mosquitto broker
that requires client certificates from the fleet CA (its config generated here, on a free
loopback port), a PostgreSQL server in a temporary directory, and MQTT clients.

Everything listens on 127.0.0.1 only and is stopped by the fixtures that start it. The
Debian packages `mosquitto` and `postgresql` must be installed (.ci/run and `make test`
install them when they run as root).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon

from controller.db import open_engine
from controller.ingest import IngestWorker
from controller.pki import FleetKeys, write_pair
from controller.settings import ControllerSettings
from controller.store import FleetStore

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
FLEET = "testfleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Poll `predicate` (a condition on real state, not a sleep) until true or time out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pki:
    """A controller home with the fleet's keys, the broker's and the controller's certs."""

    def __init__(self, root: Path, fleet: str = FLEET) -> None:
        self.home = root / "controller"
        self.home.mkdir(parents=True, mode=0o700)
        self.keys = FleetKeys(self.home)
        self.keys.init(fleet)
        self.fleet = fleet
        cert, key = self.keys.client_cert("controller")
        write_pair(self.home, "controller", cert, key)
        self.broker_dir = root / "broker"
        self.broker_dir.mkdir(mode=0o755)
        cert, key = self.keys.server_cert(["localhost"], ["127.0.0.1"])
        self.broker_cert, self.broker_key = write_pair(self.broker_dir, "broker", cert, key)
        self.ca = self.home / "fleet-ca.pem"
        self.signing_pub = self.home / "deploy-signing.pub.pem"

    def device_files(self, directory: Path, name: str, **approve: Any) -> tuple[Path, Path]:
        """A certificate for a stand-in device named `name` (tests that publish directly)."""
        cert, key, _ = self.stand_in(directory, name, **approve)
        return cert, key

    def stand_in(self, directory: Path, name: str, **approve: Any) -> tuple[Path, Path, Any]:
        """(cert, key, the controller's `Approved`) for a device that is only a test client."""
        import base64

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        audit = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        raw = base64.urlsafe_b64encode(audit).decode().rstrip("=")
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                           self.fleet)]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                   f"urn:edge-agent:audit-key:ed25519:{raw}")]), critical=False)
               .sign(key, hashes.SHA256()))
        approved = self.keys.approve(csr.public_bytes(serialization.Encoding.PEM), **approve)
        cert, k = write_pair(directory, name, approved.cert_pem, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert, k, approved


class Broker:
    """mosquitto with TLS on 127.0.0.1: client certificates from the fleet CA required, the
    certificate's CN as user name, devices confined to their own topics by ACL."""

    def __init__(self, pki: Pki, workdir: Path, *, save_every_change: bool = True) -> None:
        """`save_every_change`: persist on every change (what the delivery tests kill the
        broker against); off for brokers holding large retained artifacts, which would be
        rewritten whole on each change."""
        self.pki = pki
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o777)  # mosquitto may drop to its own user for the persistence file
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"
        acl = self.dir / "acl"
        acl.write_text("user controller\ntopic readwrite edge/v1/#\n\n"
                       "pattern readwrite edge/v1/+/%u/#\n"
                       "pattern read edge/v1/+/_artifacts/#\n")
        user = getpass.getuser()
        (self.dir / "mosquitto.conf").write_text(
            f"user {user}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            + ("autosave_interval 1\nautosave_on_changes true\n" if save_every_change
               else "autosave_interval 60\n")
            + "max_queued_messages 1000000\nmax_inflight_messages 100\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            "log_type subscribe\n"
            f"listener {self.port} 127.0.0.1\n"
            "protocol mqtt\n"
            f"cafile {pki.ca}\ncertfile {pki.broker_cert}\nkeyfile {pki.broker_key}\n"
            "require_certificate true\nuse_identity_as_username true\n"
            "tls_version tlsv1.2\n"
            "allow_anonymous false\n"
            f"acl_file {acl}\n"
        )

    def start(self) -> Broker:
        if not Path(MOSQUITTO).exists():
            raise AssertionError("mosquitto is not installed: apt-get install mosquitto "
                                 "(make test and .ci/run do this when run as root)")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._listening, 20, f"mosquitto on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"mosquitto exited: {err} {log}")
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def subscribed(self, topic_filter: str) -> int:
        """How many subscriptions to `topic_filter` the broker has logged."""
        return self.log.read_text().count(f" {topic_filter}") if self.log.exists() else 0

    def kill(self) -> None:
        """SIGKILL: what a crash or a power cut does to the broker."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postgres:
    """A throwaway PostgreSQL cluster (run as the `postgres` account when we are root)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def start(self) -> Postgres:
        if not (PG_BIN / "initdb").exists():
            raise AssertionError("PostgreSQL is not installed: apt-get install postgresql "
                                 "(make test and .ci/run do this when run as root)")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        run = [*self.as_user, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
               "-U", "postgres", "--no-sync"]
        subprocess.run(run, check=True, capture_output=True)
        opts = (f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c max_connections=50")
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts,
                        "-l", str(self.dir / "log"), "-w", "start"], check=True,
                       capture_output=True)
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "stop"], check=False, capture_output=True)


def tls_client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Client:
    """A paho MQTT 5 client on its own network thread, recording what it receives."""

    def __init__(self, broker: Broker, ctx: ssl.SSLContext, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, Any]] = []
        self._parsed: dict[int, Any] = {}  # index in messages -> its parsed JSON
        self.connack: Any = None
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.dropped = threading.Event()  # the connection ended (or never got a CONNACK)
        self.client.on_disconnect = lambda *_a: self.dropped.set()
        self.client.on_connect_fail = lambda *_a: self.dropped.set()
        self.broker = broker

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        (self.refused if reason.is_failure else self.connected).set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))

    def connect(self) -> Client:
        self.client.connect("127.0.0.1", self.broker.port, keepalive=30)
        self.client.loop_start()
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def received(self, topic_part: str) -> list[dict[str, Any]]:
        """The JSON payloads received on topics containing `topic_part`, each parsed once
        (tests poll this every 50 ms while thousands of messages arrive)."""
        with self.lock:
            items = list(enumerate(self.messages))
        out = []
        for i, (t, p, _) in items:
            if topic_part in t:
                if i not in self._parsed:
                    self._parsed[i] = json.loads(p)
                out.append(self._parsed[i])
        return out


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp that other accounts (mosquitto, postgres) can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- fixtures (import them into a test module: module-scoped, one broker each) ----------


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with scratch_dir("ea-fleet-") as path:
        yield path


@pytest.fixture(scope="module")
def pki(root: Path) -> Pki:
    return Pki(root)


@pytest.fixture(scope="module")
def broker(pki: Pki, root: Path) -> Iterator[Broker]:
    b = Broker(pki, root / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()


@dataclass
class Controller:
    settings: ControllerSettings
    store: FleetStore
    env: dict[str, str]
    worker: IngestWorker

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller", *args], env=self.env,
                              capture_output=True, text=True, check=False)

    def device(self, device_id: str) -> dict[str, Any]:
        rows = {r["device"]: r for r in self.store.fleet_status()}
        return rows.get(device_id, {})


@pytest.fixture(scope="module")
def controller(pki: Pki, broker: Broker) -> Iterator[Controller]:
    env = {**os.environ, "EDGE_CONTROLLER_HOME": str(pki.home),
           "EDGE_CONTROLLER_BROKER_HOST": "127.0.0.1",
           "EDGE_CONTROLLER_BROKER_PORT": str(broker.port)}
    settings = ControllerSettings(home=pki.home, broker_host="127.0.0.1",
                                  broker_port=broker.port)
    store = FleetStore(open_engine(settings.url), worker="w1")
    worker = IngestWorker(settings, store, "w1")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="test-ingest")
    thread.start()
    try:
        wait_until(worker.connected.is_set, 30, "the ingest worker to connect")
        yield Controller(settings, store, env, worker)
        # Everything the devices of this module sent was a valid protocol message.
        assert worker.rejected == 0, "the controller rejected device messages (see the log)"
    finally:
        stop.set()
        thread.join(10)


def agent_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, check=False, env={**os.environ, "EDGE_AGENT_HOME": str(home)})


def enroll_device(home: Path, pki: Pki, controller: Controller) -> str:
    """enroll → approve → install-cert, through the two CLIs; the device id."""
    csr = home.parent / f"{home.name}.csr"
    out = agent_cli(home, "device", "enroll", "--fleet", pki.fleet, "--out", str(csr))
    assert out.returncode == 0, out.stderr
    approved = controller.cli("device", "approve", str(csr))
    assert approved.returncode == 0, approved.stderr
    install = approved.stdout.strip().splitlines()[-1].split()
    assert install[:3] == ["edge-agent", "device", "install-cert"], approved.stdout
    out = agent_cli(home, *install[1:])
    assert out.returncode == 0, out.stderr
    info = json.loads(agent_cli(home, "device", "info", "--json").stdout)["enrollment"]
    assert info["state"] == "enrolled" and info["fleet"] == pki.fleet
    return str(info["device_id"])


def linked_daemon(home: Path, broker: Broker, **env: str) -> Daemon:
    return Daemon(home, {"EDGE_AGENT_SYNC__BROKER_HOST": "127.0.0.1",
                         "EDGE_AGENT_SYNC__BROKER_PORT": str(broker.port),
                         "EDGE_AGENT_SYNC__RECONNECT_MIN_SECONDS": "0.2",
                         "EDGE_AGENT_SYNC__RECONNECT_MAX_SECONDS": "1",
                         "EDGE_AGENT_SYNC__CONFIRM_TIMEOUT_SECONDS": "3",
                         **env})


