"""Deployments end to end, on real parts: mosquitto with mTLS, the controller's HTTPS
artifact server (`artifacts serve`, client certificates required), real daemons on real
models (SmolLM2 and Gemma 3 from their PyPI packages), the controller's CLI.

Device B's hardware is a captured Jetson Orin Nano tree (tests/fixtures/hw/) with a
`runtimes.json` constructed here claiming a CUDA build of llama.cpp: selection sees a CUDA
GPU and picks the CUDA variant; the CPU build here runs it (the file is the same GGUF,
and llama.cpp without a GPU backend ignores the offload), which is the part a GPU-less
machine cannot show for real.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_models import make_tiny_gguf
from daemon import Daemon, prepare_home
from filesystems import fill, small_fs
from fleet_env import (
    Broker,
    Controller,
    Pki,
    cpu_seconds,
    enroll_device,
    free_port,
    linked_daemon,
    wait_until,
)
from sqlalchemy import select

from controller.deploy import Publisher
from controller.pki import FleetKeys
from controller.tables import DeployStep
from fleet.auditchain import canonical_json
from fleet.deploy import SignedDocument, public_key_id
from fleet.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
JETSON = ROOT / "tests" / "fixtures" / "hw" / "jetson-orin-nano-super-jp6"
GEMMA = "gemma3-270m"
BANDWIDTH = 20_000_000  # bytes/s: a 98 MB download lasts ~5 s, long enough to interrupt


@pytest.fixture(scope="module")
def broker(pki: Pki, root: Path) -> Iterator[Broker]:
    """This module's broker holds ~100 MB of retained chunks: saved once a minute, not on
    every change."""
    b = Broker(pki, root / "mosquitto", save_every_change=False).start()
    try:
        yield b
    finally:
        b.stop()


class ArtifactServer:
    """`edge-agent-controller artifacts serve` in its own process, on a fixed port."""

    def __init__(self, controller: Controller, log: Path) -> None:
        self.controller = controller
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ArtifactServer:
        started = self.log.read_text().count("serving") if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller", "artifacts", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--ip", "127.0.0.1"],
                env=self.controller.env, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: self.log.read_text().count("serving") > started, 30,
                   "the artifact server")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def ranges(self, file: str) -> list[int]:
        """The Range starts the server was asked for, for `file`."""
        return [int(line.rsplit(" ", 1)[1]) for line in self.log.read_text().splitlines()
                if f"{file}: range from byte" in line]


@pytest.fixture(scope="module")
def artifacts(controller: Controller, root: Path) -> Iterator[ArtifactServer]:
    server = ArtifactServer(controller, root / "artifacts.log")
    controller.env["EDGE_CONTROLLER_ARTIFACT_URL"] = server.url
    server.start()
    try:
        yield server
    finally:
        server.kill()


# -- helpers ------------------------------------------------------------------------------


def cli(controller: Controller, *args: str) -> str:
    out = controller.cli(*args)
    assert out.returncode == 0, f"{args}: {out.stderr}{out.stdout}"
    return out.stdout


def add_artifact(controller: Controller, path: Path, model: str, *extra: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(cli(controller, "artifacts", "add", str(path), "--model",
                                         model, "--json", *extra))
    return row


def create(controller: Controller, *args: str) -> str:
    return str(json.loads(cli(controller, "deploy", "create", "--json", *args))["deployment"])


def status(controller: Controller, name: str, timeout: float = 150) -> dict[str, Any]:
    """`deploy status --wait`: until every device is done (active, failed, rejected...)."""
    out = controller.cli("deploy", "status", name, "--json", "--wait", "--timeout", str(timeout))
    assert out.stdout, out.stderr
    st: dict[str, Any] = json.loads(out.stdout)
    return st


def steps(controller: Controller, device: str, name: str | None = None) -> list[dict[str, Any]]:
    """The steps the controller stored for `device` (of deployment `name`)."""
    q = select(DeployStep.__table__).where(DeployStep.device_id == device)
    if name is not None:
        q = q.where(DeployStep.deployment == name)
    with controller.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(DeployStep.record_id))]


def audited(home: Path, since: int = 0) -> list[dict[str, Any]]:
    """The device's audit records of deployments after `since`."""
    with sqlite3.connect(home / "registry.db") as db:
        rows = db.execute("SELECT seq, action, resource, decision, outcome, details "
                          "FROM audit_records WHERE action LIKE 'deploy:%' AND seq > ? "
                          "ORDER BY seq", (since,)).fetchall()
    return [{"seq": r[0], "action": r[1], "resource": r[2], "decision": r[3], "outcome": r[4],
             "details": json.loads(r[5])} for r in rows]


def audit_head(home: Path) -> int:
    with sqlite3.connect(home / "registry.db") as db:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_records").fetchone()[0])


def installed(home: Path) -> dict[str, Any]:
    """What the device's registry holds and pins, and the files under its home: what a
    rejected deployment must leave exactly as it was."""
    with sqlite3.connect(home / "registry.db") as db:
        models = db.execute("SELECT m.alias, m.active_variant, v.name, v.sha256 FROM models m "
                            "JOIN variants v ON v.model_id = m.id ORDER BY 1, 3").fetchall()
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                   if p.is_file() and "registry.db" not in p.name)
    return {"models": models, "files": files}


def complete(d: Daemon, model: str, client: httpx.Client | None = None) -> str:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0}
    if client is None:
        with d.client() as c:
            r = c.post("/v1/completions", json=body)
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return str(r.json()["choices"][0]["text"])


def first_step(controller: Controller, device: str, name: str,
               match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [s for s in steps(controller, device, name) if match(s)]
        return bool(found)

    wait_until(seen, 120, f"a step of {name} on {device}")
    return found[0]


def cpu_seconds_over(pid: int, window: float) -> float:
    """CPU time (user + system) process `pid` used during `window` seconds of wall time: a
    measurement over a fixed window, not a wait for something to happen."""
    before = cpu_seconds(pid)
    time.sleep(window)
    return cpu_seconds(pid) - before


def make_jetson_root(dest: Path) -> Path:
    """The captured Jetson tree, plus a constructed capture of a CUDA build of llama.cpp."""
    shutil.copytree(JETSON, dest)
    capture = dest / "var" / "lib" / "edge-agent" / "capture"
    capture.mkdir(parents=True, exist_ok=True)
    (capture / "runtimes.json").write_text(json.dumps({
        "llama_cpp_version": "0.3.36", "llama_gpu_offload": True, "llama_backends": ["cuda"],
        "backends": ["gguf"]}))
    return dest


# -- the fleet of this module -----------------------------------------------------------


class Device:
    def __init__(self, home: Path, device_id: str, daemon: Daemon) -> None:
        self.home, self.id, self.d = home, device_id, daemon


@pytest.fixture(scope="module")
def fleet_root(root: Path) -> Path:
    path = root / "devices"
    path.mkdir()
    return path


def new_device(fleet_root: Path, name: str, pki: Pki, controller: Controller, broker: Broker,
               models: dict[str, Path], group: str | None = None, *, wait: bool = True,
               **env: str) -> Device:
    home = prepare_home(fleet_root / name, models)
    dev = enroll_device(home, pki, controller)
    if group is not None:
        cli(controller, "device", "group", dev, group)
    d = linked_daemon(home, broker, **env).start()
    if wait:
        online(controller, Device(home, dev, d), name)
    return Device(home, dev, d)


def online(controller: Controller, dev: Device, name: str) -> None:
    wait_until(lambda: controller.device(dev.id).get("state") == "online", 30, f"{name} online")


@pytest.fixture(scope="module")
def gemma3_q8(gemma3_gguf: Path, fleet_root: Path) -> Path:
    from agent.runtime.quantize import quantize_gguf

    dst = fleet_root / "gemma-3-270m-Q8_0.gguf"
    return quantize_gguf(gemma3_gguf, dst, "Q8_0", threads=2,
                         expected_size=gemma3_gguf.stat().st_size * 2)


# -- end to end ---------------------------------------------------------------------------


def test_a_group_deployment_picks_per_device_variants_and_switches_without_a_gap(
    pki: Pki, broker: Broker, controller: Controller, artifacts: ArtifactServer,
    fleet_root: Path, smollm2_gguf: Path, gemma3_gguf: Path, gemma3_q8: Path
) -> None:
    cpu = add_artifact(controller, gemma3_gguf, GEMMA, "--name", "gguf-q4_k_m-cpu")
    add_artifact(controller, gemma3_gguf, GEMMA, "--name", "gguf-q4_k_m-cuda",
                 "--target", "cuda")
    models = {"smol": smollm2_gguf}
    # The three start together (each still waits for its own READY), then come online.
    a = new_device(fleet_root, "a", pki, controller, broker, models, "kiosks", wait=False)
    b = new_device(fleet_root, "b", pki, controller, broker, models, "kiosks", wait=False,
                   EDGE_AGENT_SELECTION__HARDWARE_ROOT=str(make_jetson_root(fleet_root / "jet")))
    c = new_device(fleet_root, "c", pki, controller, broker, models, wait=False)
    for dev, name in ((a, "a"), (b, "b"), (c, "c")):
        online(controller, dev, name)
    try:
        c_before = installed(c.home)
        rbac = fleet_root / "rbac.yaml"
        rbac.write_text((ROOT / "policies" / "rbac.yaml").read_text()
                        + "\n# deployed to the kiosks\n")
        t0 = time.time()
        name = create(controller, "--model", GEMMA, "--policy", str(rbac), "--group", "kiosks")
        st = status(controller, name)
        by_device = {x["device"]: x for x in st["devices"]}
        assert set(by_device) == {a.id, b.id}, "only the group's devices were targeted"
        chosen = {}
        for dev, want in ((a, "gguf-q4_k_m-cpu"), (b, "gguf-q4_k_m-cuda")):
            entry = by_device[dev.id]
            assert entry["state"] == "active", entry
            why = next(s["reason"] for s in entry["steps"]
                       if s["model"] == GEMMA and s["step"] == "queued")
            assert entry["models"][GEMMA]["variant"] == want, (why, dev.d.log.read_text())
            chosen[dev.id] = why
            assert why.startswith("selected for this device:"), why
            active = next(s for s in entry["steps"] if s["step"] == "active" and s["model"])
            moved = next(s["bytes_moved"] for s in entry["steps"] if s["step"] == "installed")
            assert moved == cpu["size"], "each device downloaded the artifact exactly once"
            print(f"\n{dev.id}: {want} active {active['time'] - t0:.1f}s after deploy create; "
                  f"{moved} bytes moved for a {cpu['size']}-byte artifact; why: {why}")
        assert "runs on cuda" in chosen[b.id] and "cuda" not in chosen[a.id]
        # An app on the device gets answers from the deployed model.
        assert complete(a.d, GEMMA)
        # The RBAC policy took on both, as each reports it.
        digest = hashlib.sha256(rbac.read_bytes()).hexdigest()
        for dev in (a, b):
            wait_until(lambda dev=dev: controller.device(dev.id)["reported"].get(
                "policy_hashes", {}).get("rbac") == digest, 30, "the reported policy hash")
            assert any(r["action"] == "deploy:switch" and r["decision"] == "allow"
                       for r in audited(dev.home))
        # The device outside the group: nothing received, nothing changed.
        assert installed(c.home) == c_before
        with sqlite3.connect(c.home / "registry.db") as db:
            assert db.execute("SELECT COUNT(*) FROM sync_deployments").fetchone()[0] == 0
        assert not steps(controller, c.id)

        # A better variant appears (Q8_0): A switches to it while an app keeps asking.
        add_artifact(controller, gemma3_q8, GEMMA, "--name", "gguf-q8_0-cpu")
        stop = threading.Event()
        answered: list[float] = []
        errors: list[str] = []

        def hammer() -> None:
            with a.d.client() as client:
                while not stop.is_set():
                    try:
                        complete(a.d, GEMMA, client)
                        answered.append(time.monotonic())
                    except (AssertionError, httpx.HTTPError) as exc:
                        errors.append(str(exc)[:200])

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            wait_until(lambda: len(answered) >= 3, 60, "requests before the deployment")
            t1 = time.time()
            second = create(controller, "--model", GEMMA, "--device", a.id)
            entry = status(controller, second)["devices"][0]
            n_before = len(answered)
            wait_until(lambda: len(answered) >= n_before + 3, 60, "requests after the switch")
        finally:
            stop.set()
            thread.join(60)
        assert entry["state"] == "active" and entry["models"][GEMMA]["variant"] == \
            "gguf-q8_0-cpu", entry
        assert not errors, errors[:3]
        gaps = [y - x for x, y in itertools.pairwise(answered)]
        active = next(s for s in entry["steps"] if s["step"] == "active")
        print(f"A: gguf-q8_0-cpu active {active['time'] - t1:.1f}s after deploy create; "
              f"{len(answered)} requests answered during download and switch, median "
              f"{statistics.median(gaps) * 1000:.0f} ms apart, longest gap "
              f"{max(gaps) * 1000:.0f} ms")
        # No request waited for the download or a load: the longest gap is a small part of
        # the time the deployment took (the new variant was loaded beside the old one, and
        # the download, hashing and install ran on the low-priority deployment thread; at
        # the same priority as serving they stalled one request for 2-3 s on 2 cores).
        took = active["time"] - t1
        assert max(gaps) < 0.35 * took, (max(gaps), took)
        with sqlite3.connect(a.home / "registry.db") as db:
            names = {r[0] for r in db.execute(
                "SELECT v.name FROM variants v JOIN models m ON v.model_id = m.id "
                "WHERE m.alias = ?", (GEMMA,))}
        assert names == {"gguf-q4_k_m-cpu", "gguf-q8_0-cpu"}, "the previous variant is kept"
        wait_until(lambda: controller.device(a.id)["active"].get(GEMMA) == "gguf-q8_0-cpu", 30,
                   "A to report the new variant")
    finally:
        for dev in (a, b, c):
            dev.d.stop()


# -- what a device refuses ----------------------------------------------------------------


class Forger:
    """Documents for one device, signed (or not) in every way the device must refuse."""

    def __init__(self, pki: Pki, controller: Controller, device: str) -> None:
        self.keys = FleetKeys(pki.home)
        self.key = self.keys.signing_key()
        self.key_id = public_key_id(self.key.public_key())
        self.fleet = pki.fleet
        self.device = device
        self.topic = Topics(controller.settings.topic_prefix, pki.fleet, device)("desired")
        self.controller = controller
        self.version = 10

    def body(self, name: str, version: int | None = None, **extra: Any) -> dict[str, Any]:
        if version is None:
            self.version += 1
            version = self.version
        return {"v": 1, "fleet": self.fleet, "device": self.device, "version": version,
                "deployment": name, "created": time.time(), **extra}

    def sign(self, body: dict[str, Any], key: Any = None, key_id: str | None = None) -> bytes:
        payload = canonical_json(body).encode()
        key = key or self.key
        return SignedDocument(
            key_id=key_id or self.key_id, payload=base64.b64encode(payload).decode(),
            signature=base64.b64encode(key.sign(payload)).decode(),
        ).model_dump_json().encode()

    def send(self, raw: bytes) -> None:
        with Publisher(self.controller.settings, client_id="test-forger") as pub:
            pub.publish([(self.topic, raw)])


def variant(row: dict[str, Any], url: str, **changes: Any) -> dict[str, Any]:
    v = {"name": row["name"], "format": row["format"], "quantization": row["quantization"],
         "target": row["target"], "size": row["size"], "sha256": row["sha256"],
         "file": row["file"], "source": {"https": f"{url}/{row['file']}"}}
    v.update(changes)
    return v


def model(alias: str, *variants: dict[str, Any]) -> dict[str, Any]:
    return {"alias": alias, "task": "completion", "variants": list(variants)}


def _tampered(f: Forger, row: dict[str, Any], url: str) -> bytes:
    raw = json.loads(f.sign(f.body("tampered", settings={"logging.level": "INFO"})))
    payload = base64.b64decode(raw["payload"]).replace(b'"INFO"', b'"DEBUG"')
    raw["payload"] = base64.b64encode(payload).decode()
    return json.dumps(raw).encode()


def _wrong_key(f: Forger, row: dict[str, Any], url: str) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return f.sign(f.body("wrong-key", models=[model("smol2", variant(row, url))]),
                  key=ed25519.Ed25519PrivateKey.generate())


def _unknown_key(f: Forger, row: dict[str, Any], url: str) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other = ed25519.Ed25519PrivateKey.generate()
    return f.sign(f.body("unknown-key", models=[model("smol2", variant(row, url))]), key=other,
                  key_id=public_key_id(other.public_key()))


def _older(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("older", version=1, models=[model("smol2", variant(row, url))]))


def _other_device(f: Forger, row: dict[str, Any], url: str) -> bytes:
    body = f.body("other-device", models=[model("smol2", variant(row, url))])
    body["device"] = "someone-else"
    return f.sign(body)


def _dotdot_name(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("dotdot-name", models=[model("smol2", variant(
        row, url, file="../../registry.db"))]))


def _absolute_name(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("absolute-name", models=[model("smol2", variant(
        row, url, file="/etc/passwd"))]))


def _dotdot_url(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("dotdot-url", models=[model("smol2", variant(
        row, url, source={"https": f"{url}/../../etc/{row['file']}"}))]))


def _exceeds_disk(f: Forger, row: dict[str, Any], url: str) -> bytes:
    free = shutil.disk_usage(f.controller.settings.home).free
    return f.sign(f.body("exceeds-disk", models=[model("smol2", variant(
        row, url, size=free * 4))]))


def _sha_mismatch(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("sha-mismatch", models=[model("smol2", variant(
        row, url, sha256=hashlib.sha256(b"something else").hexdigest()))]))


def _oversize(f: Forger, row: dict[str, Any], url: str) -> bytes:
    return f.sign(f.body("oversize", models=[model("smol2", variant(
        row, url, size=row["size"] // 2))]))


# (case, what the device says, whether the document itself is refused before anything is
# fetched, or accepted and its artifact then refused)
CASES = [
    (_tampered, "tampered or forged", True),
    (_wrong_key, "tampered or forged", True),
    (_unknown_key, "not the pinned key", True),
    ("replayed", "not newer", True),
    (_older, "not newer", True),
    (_other_device, "is for", True),
    (_dotdot_name, "invalid document", True),
    (_absolute_name, "invalid document", True),
    (_dotdot_url, "invalid document", True),
    (_exceeds_disk, "kept in reserve", True),
    (_sha_mismatch, "sha256 mismatch", False),
    (_oversize, "larger than the declared", False),
]


@pytest.fixture(scope="module")
def target(pki: Pki, broker: Broker, controller: Controller, artifacts: ArtifactServer,
           fleet_root: Path, smollm2_gguf: Path
           ) -> Iterator[tuple[Device, Forger, bytes, dict[str, Any]]]:
    """A device that accepted two deployments (v1, v2): the first one's bytes are kept to
    replay. The artifact the documents name is small: what is checked does not depend on
    its size, and the cases that fetch it stay quick."""
    dev = new_device(fleet_root, "target", pki, controller, broker, {"smol": smollm2_gguf})
    forger = Forger(pki, controller, dev.id)
    row = add_artifact(controller, make_tiny_gguf(fleet_root / "tiny-F32.gguf",
                                                  vocab_size=4096, embedding_length=64),
                       "tiny", "--quantization", "F32")
    try:
        docs = [forger.sign(forger.body(f"valid-{v}", version=v,
                                        settings={"sync.heartbeat_seconds": 60 + v}))
                for v in (1, 2)]
        for v, raw in enumerate(docs, 1):
            forger.send(raw)
            first_step(controller, dev.id, f"valid-{v}", lambda s: s["step"] == "installed")
        yield dev, forger, docs[0], row
        # After all that, the agent is idle again: no loop left spinning by a refusal.
        assert dev.d.proc is not None
        assert cpu_seconds_over(dev.d.proc.pid, 2.0) < 0.5, "the idle agent keeps a CPU busy"
    finally:
        dev.d.stop()


@pytest.mark.parametrize(("make", "says", "before_fetch"), CASES,
                         ids=[c[0] if isinstance(c[0], str) else c[0].__name__[1:]
                              for c in CASES])
def test_a_bad_document_or_artifact_is_rejected_audited_reported_and_changes_nothing(
    target: tuple[Device, Forger, bytes, dict[str, Any]], controller: Controller,
    artifacts: ArtifactServer, make: Any, says: str, before_fetch: bool
) -> None:
    dev, forger, replay, row = target
    raw = replay if make == "replayed" else make(forger, row, artifacts.url)
    before = installed(dev.home)
    seq = audit_head(dev.home)
    known = {s["id"] for s in steps(controller, dev.id)}
    forger.send(raw)

    def rejected() -> list[dict[str, Any]]:
        return [s for s in steps(controller, dev.id)
                if s["id"] not in known and s["step"] == "rejected"]

    wait_until(lambda: bool(rejected()), 120, "the rejection at the controller")
    reason = rejected()[0]["reason"]
    assert says.strip() in reason, reason
    wait_until(lambda: any(r["decision"] == "deny" for r in audited(dev.home, seq)), 30,
               "the audit record")
    denied = [r for r in audited(dev.home, seq) if r["decision"] == "deny"]
    assert denied[0]["outcome"] == "rejected", denied
    accepted = [r for r in audited(dev.home, seq) if r["outcome"] == "accepted"]
    assert (not accepted) == before_fetch, "refused before anything was fetched" \
        if before_fetch else "the document was valid; its artifact was not"
    assert installed(dev.home) == before, "a rejected deployment changed the device"
    assert complete(dev.d, "smol")


# -- smoke test, resume, the broker-only path ------------------------------------------


def test_a_variant_that_fails_its_smoke_test_is_rolled_back_and_the_old_one_serves(
    pki: Pki, broker: Broker, controller: Controller, artifacts: ArtifactServer,
    fleet_root: Path, smollm2_gguf: Path
) -> None:
    # Signed by the controller, sha256 right, loads nowhere: a GGUF with no real tensors.
    broken = make_tiny_gguf(fleet_root / "broken-F32.gguf", file_type=0)
    dev = new_device(fleet_root, "smoke", pki, controller, broker, {"smol": smollm2_gguf})
    try:
        first = complete(dev.d, "smol")
        before = installed(dev.home)
        add_artifact(controller, broken, "smol", "--quantization", "F32", "--task",
                     "completion", "--name", "gguf-f32-cpu")
        name = create(controller, "--model", "smol", "--device", dev.id)
        entry = status(controller, name)["devices"][0]
        assert entry["state"] == "rolled-back", entry
        step = entry["models"]["smol"]
        assert step["variant"] == "gguf-f32-cpu" and "smoke test failed" in step["reason"]
        assert complete(dev.d, "smol") == first, "the previous variant keeps serving"
        assert installed(dev.home)["models"] == before["models"], "the broken one is removed"
        assert any(r["action"] == "deploy:switch" and r["outcome"] == "rolled-back"
                   for r in audited(dev.home))
    finally:
        dev.d.stop()


def test_downloads_resume_after_the_server_dies_and_after_the_agent_is_killed(
    pki: Pki, broker: Broker, controller: Controller, artifacts: ArtifactServer,
    fleet_root: Path, smollm2_gguf: Path
) -> None:
    row = add_artifact(controller, smollm2_gguf, "smol2")
    part_of = lambda d: d.home / "downloads" / f"{row['sha256']}.part"  # noqa: E731
    dev = new_device(fleet_root, "resume", pki, controller, broker, {})
    try:
        # 1. The artifact server is killed mid-download and comes back.
        name = create(controller, "--model", "smol2", "--device", dev.id, "--bandwidth",
                      str(BANDWIDTH))
        first_step(controller, dev.id, name, lambda s: (s["percent"] or 0) >= 20)
        artifacts.kill()
        wait_until(lambda: "interrupted" in dev.d.log.read_text(), 30, "the agent to notice")
        have = part_of(dev).stat().st_size
        artifacts.start()
        entry = status(controller, name)["devices"][0]
        assert entry["state"] == "active", entry
        resumed = artifacts.ranges(row["file"])
        assert resumed == [have], (resumed, have)
        moved = next(s["bytes_moved"] for s in entry["steps"] if s["step"] == "installed")
        assert moved == row["size"], "no byte was fetched twice"
        print(f"\nserver killed at {have} of {row['size']} bytes; resumed from byte "
              f"{resumed[0]}; {moved} bytes moved")
        assert complete(dev.d, "smol2")

        # 2. The agent is killed (SIGKILL) mid-download and restarted.
        cli(controller, "artifacts", "add", str(smollm2_gguf), "--model", "smol3")
        name = create(controller, "--model", "smol3", "--device", dev.id, "--bandwidth",
                      str(BANDWIDTH))
        first_step(controller, dev.id, name, lambda s: (s["percent"] or 0) >= 20)
        assert dev.d.proc is not None
        dev.d.proc.send_signal(signal.SIGKILL)
        dev.d.proc.wait()
        have = part_of(dev).stat().st_size
        n_ranges = len(artifacts.ranges(row["file"]))
        dev.d.start()
        entry = status(controller, name)["devices"][0]
        assert entry["state"] == "active", entry
        assert artifacts.ranges(row["file"])[n_ranges:] == [have]
        print(f"agent killed at {have} of {row['size']} bytes; resumed from byte {have}")
        assert complete(dev.d, "smol3")
    finally:
        dev.d.stop()


def test_a_disk_that_fills_during_a_download_fails_the_model_and_the_device_keeps_serving(
    pki: Pki, broker: Broker, controller: Controller, artifacts: ArtifactServer,
    smollm2_gguf: Path
) -> None:
    """The device's home is a real 160 MB tmpfs; once the download has begun, the test
    fills it. The model fails with the reason, the partial file is gone (so the device's
    own database and audit have room again), nothing is installed, and the device answers."""
    row = add_artifact(controller, smollm2_gguf, "smolfull")
    with small_fs("160m") as fs:
        dev = new_device(fs, "full", pki, controller, broker, {})
        try:
            name = create(controller, "--model", "smolfull", "--device", dev.id, "--bandwidth",
                          str(BANDWIDTH), "--disk-reserve", "0")
            first_step(controller, dev.id, name, lambda s: (s["percent"] or 0) >= 10)
            filler = fill(fs)
            entry = status(controller, name)["devices"][0]
            assert entry["state"] == "failed", entry
            failed = next(s for s in entry["steps"] if s["step"] == "failed")
            assert "not enough disk: it filled during the download" in failed["reason"], failed
            assert "the partial download was removed" in failed["reason"]
            assert not (dev.home / "downloads" / f"{row['sha256']}.part").exists()
            assert installed(dev.home)["models"] == []
            assert any(r["action"] == "deploy:model" and r["outcome"] == "failed"
                       for r in audited(dev.home))
            with dev.d.client() as c:
                assert c.get("/v1/models").status_code == 200
            filler.unlink(missing_ok=True)
        finally:
            dev.d.stop()


def test_the_broker_alone_delivers_a_model_in_chunks_across_an_agent_restart(
    pki: Pki, broker: Broker, controller: Controller, fleet_root: Path, smollm2_gguf: Path
) -> None:
    env = {k: v for k, v in controller.env.items() if k != "EDGE_CONTROLLER_ARTIFACT_URL"}
    row = add_artifact(controller, smollm2_gguf, "smolmq")
    published = subprocess.run([sys.executable, "-m", "controller", "artifacts", "publish",
                                row["sha256"][:12], "--chunk-size", str(1 << 20)], env=env,
                               capture_output=True, text=True, check=False)
    assert published.returncode == 0, published.stderr
    dev = new_device(fleet_root, "mqtt-only", pki, controller, broker, {})
    try:
        t0 = time.time()
        name = create(controller, "--model", "smolmq", "--device", dev.id, "--mqtt",
                      "--bandwidth", str(BANDWIDTH))
        first_step(controller, dev.id, name, lambda s: (s["percent"] or 0) >= 30)
        assert dev.d.proc is not None
        dev.d.proc.send_signal(signal.SIGKILL)
        dev.d.proc.wait()
        dev.d.start()
        entry = status(controller, name, timeout=180)["devices"][0]
        assert entry["state"] == "active", (entry, dev.d.log.read_text()[-3000:])
        moved = next(s["bytes_moved"] for s in entry["steps"] if s["step"] == "installed")
        active = next(s for s in entry["steps"] if s["step"] == "active")
        print(f"\nMQTT chunks: active {active['time'] - t0:.1f}s after deploy create (agent "
              f"killed on the way); {moved} bytes moved after the restart of {row['size']}")
        assert 0 < moved < row["size"] * 0.8, "the chunks already on disk were kept"
        assert complete(dev.d, "smolmq")
    finally:
        dev.d.stop()
