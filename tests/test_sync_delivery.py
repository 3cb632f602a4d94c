"""Nothing lost offline: the broker killed mid-production, the agent killed mid-flush.
Every audit record and every telemetry record within quota reaches the controller once
(after its de-duplication), in order per class, and inference is served throughout."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from daemon import prepare_home
from fleet_env import (
    Broker,
    Controller,
    Pki,
    cpu_seconds,
    enroll_device,
    linked_daemon,
    wait_until,
)
from sqlalchemy import func, select

from controller.tables import AuditRecord, Telemetry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PRODUCER = Path(__file__).with_name("sync_producer.py")


def _counts(controller: Controller, device: str) -> tuple[int, int]:
    with controller.store.engine.connect() as conn:
        audit = conn.execute(select(func.count()).select_from(AuditRecord).where(
            AuditRecord.device_id == device)).scalar_one()
        telemetry = conn.execute(select(func.count()).select_from(Telemetry).where(
            Telemetry.device_id == device)).scalar_one()
    return int(audit), int(telemetry)


def _device_audit_head(home: Path) -> int:
    import sqlite3

    with sqlite3.connect(home / "registry.db") as db:
        return int(db.execute("SELECT MAX(seq) FROM audit_records").fetchone()[0])


def _device_telemetry_made(home: Path) -> int:
    """Telemetry records the device ever made (the producer's and the daemon's own job's):
    outbox ids are never reused, so the sequence counts them."""
    import sqlite3

    with sqlite3.connect(home / "registry.db") as db:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'sync_outbox'").fetchone()
    return int(row[0]) if row else 0


def _in_order(controller: Controller, device: str) -> bool:
    """Telemetry was stored in the order of its record ids (the insertion id grows with it)."""
    with controller.store.engine.connect() as conn:
        ids = [r for (r,) in conn.execute(select(Telemetry.record_id).where(
            Telemetry.device_id == device).order_by(Telemetry.id))]
    return ids == sorted(ids)


def _complete(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 4,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def test_broker_killed_while_10000_records_are_produced(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller, smollm2_gguf: Path
) -> None:
    home = prepare_home(tmp_path / "device", {"smol": smollm2_gguf})
    dev = enroll_device(home, pki, controller)
    # The reconnect backoff is capped low: the outage lasts as long as the producer runs
    # (a minute on a slow runner), and an uncapped delay after it is not what is measured.
    d = linked_daemon(home, broker, EDGE_AGENT_SYNC__TELEMETRY_SECONDS="3600",
                      EDGE_AGENT_SYNC__BATCH_RECORDS="200",
                      EDGE_AGENT_SYNC__RECONNECT_MAX_SECONDS="5",
                      EDGE_AGENT_SYNC__CONFIRM_TIMEOUT_SECONDS="15").start()
    try:
        wait_until(lambda: controller.device(dev).get("state") == "online", 30, "online")
        with d.client() as c:
            before = [_complete(c) for _ in range(5)]
        producer = subprocess.Popen([sys.executable, str(PRODUCER), str(home), "6000", "4000"],
                                    stdout=subprocess.PIPE, text=True)
        assert producer.stdout is not None
        for line in producer.stdout:
            if line.startswith("progress") and int(line.split()[1]) >= 1500:
                break
        broker.kill()  # SIGKILL mid-production: messages in flight, PUBACKs lost
        with d.client() as c:
            wait_until(lambda: c.get("/agent/v1/sync").json()["state"] != "connected", 30,
                       "the agent to notice the broker is gone")
            during = [_complete(c) for _ in range(5)]
        rest = producer.stdout.read()
        assert producer.wait(60) == 0 and "done" in rest
        broker.start()  # same port, same persistence
        head = _device_audit_head(home)

        def everything() -> bool:
            made = _device_telemetry_made(home)
            return made >= 4000 and _counts(controller, dev) == (_device_audit_head(home), made)

        try:
            wait_until(everything, 180, f"all {head}+ audit and 4000+ telemetry at the controller")
        except AssertionError as exc:
            with d.client() as c:
                sync = c.get("/agent/v1/sync").json()
            raise AssertionError(f"{exc}; controller has {_counts(controller, dev)}, device "
                                 f"made {_device_telemetry_made(home)}; link {sync}") from exc
        head = _device_audit_head(home)
        # Each record once; the controller's view (by id) is the device's order. Arrival
        # order can differ here: batches the broker dropped while no worker was subscribed
        # come again after their confirmation timed out, behind later ones.
        ids = [r["id"] for r in controller.store.telemetry_tail(dev, 100_000)]
        assert ids == sorted(set(ids)) and len(ids) == _device_telemetry_made(home)
        result, forks = controller.store.audit_verify(dev)
        assert result.ok and result.records == head and not forks, result.line()
        with d.client() as c:
            sync = c.get("/agent/v1/sync").json()
        assert sync["backlog"]["audit"] == 0 and sync["backlog"]["telemetry"] == 0
        print(f"\ninference latency before the outage: median "
              f"{statistics.median(before) * 1000:.0f} ms; with the broker down: "
              f"{statistics.median(during) * 1000:.0f} ms")
        # The dead link never slowed a request (generous bound: the producer shares the CPU).
        assert statistics.median(during) < 3 * statistics.median(before) + 0.5
    finally:
        if broker.proc is None or broker.proc.poll() is not None:
            broker.start()
        d.stop()


def test_agent_killed_mid_flush_loses_nothing(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller
) -> None:
    home = tmp_path / "device"
    dev = enroll_device(home, pki, controller)
    # Records pile up while the device has no link at all...
    out = subprocess.run([sys.executable, str(PRODUCER), str(home), "5000", "3000"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    head = _device_audit_head(home)
    made = _device_telemetry_made(home)
    # ...then the agent connects with small batches and is killed while it flushes.
    d = linked_daemon(home, broker, EDGE_AGENT_SYNC__BATCH_RECORDS="50",
                      EDGE_AGENT_SYNC__FLUSH_MESSAGES_PER_SECOND="40",
                      EDGE_AGENT_SYNC__TELEMETRY_SECONDS="3600").start()
    wait_until(lambda: sum(_counts(controller, dev)) > 0, 60, "the flush to start")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    got = _counts(controller, dev)
    assert got[0] < head or got[1] < made, "the flush finished before the kill: nothing tested"
    d2 = linked_daemon(home, broker, EDGE_AGENT_SYNC__TELEMETRY_SECONDS="3600").start()
    try:
        wait_until(lambda: _counts(controller, dev) == (_device_audit_head(home),
                                                        _device_telemetry_made(home)), 120,
                   "everything at the controller after the restart")
        result, forks = controller.store.audit_verify(dev)
        assert result.ok and not forks, result.line()
        assert _in_order(controller, dev)
    finally:
        d2.stop()


def test_a_rate_limited_flush_starves_no_class_and_idles_without_spinning(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller
) -> None:
    # A low rate and small batches: the bucket runs dry again and again. Once, classes with
    # nothing to send used up each new token before telemetry (last in order) got one, and
    # the flusher spun on the empty bucket: telemetry never left, a CPU stayed busy.
    home = tmp_path / "device"
    dev = enroll_device(home, pki, controller)
    out = subprocess.run([sys.executable, str(PRODUCER), str(home), "30", "300"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    d = linked_daemon(home, broker, EDGE_AGENT_SYNC__BATCH_RECORDS="10",
                      EDGE_AGENT_SYNC__FLUSH_MESSAGES_PER_SECOND="10",
                      EDGE_AGENT_SYNC__TELEMETRY_SECONDS="3600").start()
    try:
        wait_until(lambda: _counts(controller, dev) == (_device_audit_head(home),
                                                        _device_telemetry_made(home)),
                   60, "every record at the controller")
        assert d.proc is not None
        before = cpu_seconds(d.proc.pid)
        time.sleep(2.0)  # a measurement window over an idle agent, not a synchronisation
        assert cpu_seconds(d.proc.pid) - before < 0.4, "the idle flusher keeps a CPU busy"
    finally:
        d.stop()
