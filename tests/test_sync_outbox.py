"""The outbox on a real SQLite database: quotas that drop and report, classes that never
drop and alarm, corrupt rows quarantined (never silently deleted), acknowledgements in
order, the audit chain shipped and checked by the controller's own code, scheduled jobs
that coalesce after a long sleep, and the protocol document in step with the models."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from agent.security.audit import AuditEntry, AuditLog
from agent.security.keys import load_or_create_device_key
from agent.sync import enroll
from agent.sync.jobs import Jobs
from agent.sync.outbox import Outbox, Quarantined
from controller.db import open_engine
from controller.pki import FleetKeys
from controller.store import FleetStore
from fleet import messages, schema
from localdb import StateDir, open_database

ROOT = Path(__file__).resolve().parents[1]


def _db(tmp_path: Path):  # type: ignore[no-untyped-def]
    return open_database(StateDir(tmp_path).db)


def _snap(i: int) -> dict[str, object]:
    return {"snapshot": {"boot": "b", "uptime_s": float(i), "rss_bytes": 1, "cpu_percent": 0.0,
                         "disk_free_bytes": 1, "disk_total_bytes": 2, "pad": "x" * 60}}


def test_telemetry_over_quota_drops_the_oldest_and_reports_the_count(tmp_path: Path) -> None:
    db = _db(tmp_path)
    outbox = Outbox(db, quotas={"telemetry": 4096}, alarms={})
    ids = [outbox.add("telemetry", _snap(i)) for i in range(200)]
    sizes = outbox.sizes()
    assert sizes["telemetry"] <= 4096
    kept = outbox.backlog()["telemetry"]
    assert 0 < kept < 200
    assert outbox.dropped() == {"telemetry": 200 - kept}
    batch = outbox.batch("telemetry", None, 1000)
    assert batch is not None
    # The newest survive, in order; the batch carries the count of those dropped.
    assert [r["id"] for r in batch.records] == ids[-kept:]
    assert batch.dropped == 200 - kept
    payload = messages.TelemetryBatch.model_validate(batch.payload("dev1"))
    assert payload.dropped == 200 - kept
    outbox.ack([batch])
    assert outbox.backlog()["telemetry"] == 0 and outbox.dropped() == {"telemetry": 0}
    assert outbox.sizes()["telemetry"] == 0
    db.close()


def test_audit_and_deploy_are_never_dropped_and_alarm(tmp_path: Path) -> None:
    db = _db(tmp_path)
    outbox = Outbox(db, quotas={"telemetry": 4096}, alarms={"audit": 2000, "deploy": 2000})
    with AuditLog(db, load_or_create_device_key(tmp_path)) as log:
        for i in range(100):
            log.append(AuditEntry(subject="s", action="a", resource=f"r{i}", decision="allow",
                                  outcome="ok"))
    for i in range(100):
        outbox.add("deploy", {"deployment": "d1", "step": "downloading", "percent": i})
    assert outbox.backlog()["audit"] == 100 and outbox.backlog()["deploy"] == 100
    alarms = outbox.alarms()
    assert set(alarms) == {"audit", "deploy"}
    assert outbox.dropped().get("deploy", 0) == 0
    # Appending deploy status past its alarm size still keeps every row.
    outbox.add("deploy", {"deployment": "d1", "step": "active"})
    assert outbox.backlog()["deploy"] == 101
    db.close()


def test_a_corrupt_row_is_quarantined_reported_and_kept(tmp_path: Path) -> None:
    db = _db(tmp_path)
    found: list[Quarantined] = []
    outbox = Outbox(db, quotas={}, alarms={}, on_quarantine=found.extend)
    ids = [outbox.add("telemetry", _snap(i)) for i in range(5)]
    with sqlite3.connect(StateDir(tmp_path).db) as raw:  # bit rot in one row's body
        raw.execute("UPDATE sync_outbox SET body = replace(body, 'pad', 'PAD') WHERE id = ?",
                    (ids[2],))
    batch = outbox.batch("telemetry", None, 100)
    assert batch is not None
    assert [r["id"] for r in batch.records] == [ids[0], ids[1], ids[3], ids[4]]
    assert [(q.outbox_id, q.cls) for q in found] == [(ids[2], "telemetry")]
    assert "CRC32" in found[0].reason
    assert outbox.quarantined() == 1
    with sqlite3.connect(StateDir(tmp_path).db) as raw:
        body = raw.execute("SELECT body FROM sync_quarantine WHERE outbox_id = ?",
                           (ids[2],)).fetchone()[0]
    assert "PAD" in body  # kept aside for recovery, not deleted
    db.close()


def test_an_append_belongs_to_the_callers_transaction(tmp_path: Path) -> None:
    db = _db(tmp_path)
    outbox = Outbox(db, quotas={}, alarms={})
    with pytest.raises(RuntimeError), db.write_connection() as conn:
        conn.exec_driver_sql("INSERT INTO model_events (alias, time, kind, details) "
                             "VALUES ('m', '2026-12-03 00:00:00', 'deployed', '{}')")
        outbox.append(conn, "deploy", {"step": "active"})
        raise RuntimeError("the request failed after writing")
    assert outbox.backlog()["deploy"] == 0 and outbox.backlog()["events"] == 0
    with db.write_connection() as conn:
        conn.exec_driver_sql("INSERT INTO model_events (alias, time, kind, details) "
                             "VALUES ('m', '2026-12-03 00:00:00', 'deployed', '{}')")
        outbox.append(conn, "deploy", {"step": "active"})
    assert outbox.backlog()["deploy"] == 1 and outbox.backlog()["events"] == 1
    db.close()


# -- the audit chain, shipped and checked by the controller -----------------------------


def _enrolled_controller(tmp_path: Path, home: Path) -> tuple[FleetStore, str]:
    keys = FleetKeys(tmp_path / "controller")
    keys.init("f1")
    approved = keys.approve(enroll.enroll(home, "f1"))
    store = FleetStore(open_engine(f"sqlite:///{tmp_path / 'controller.db'}"))
    store.add_device(approved)
    return store, approved.device_id


def _ship(home: Path, store: FleetStore, device: str, outbox: Outbox) -> None:
    """What the link does, minus the broker: batches from the outbox into the store."""
    after = None
    while (batch := outbox.batch("audit", after, 25)) is not None:
        body = json.dumps(batch.payload(device)).encode()
        store.handle("f1", device, "audit", body)
        after = batch.last


@pytest.mark.parametrize(("tamper", "reason"), [
    ("delete", "record 37 is missing (deleted)"),
    ("edit", "record does not match its digest"),
    ("reorder", "record does not match its digest"),
])
def test_the_controller_names_the_first_bad_seq_of_a_tampered_device_log(
    tmp_path: Path, tamper: str, reason: str
) -> None:
    home = tmp_path / "device"
    db = open_database(StateDir(home).db)
    with AuditLog(db, load_or_create_device_key(home), checkpoint_every=10) as log:
        for i in range(1, 81):
            log.append(AuditEntry(subject="uid:0(root)", action="models:write",
                                  resource=f"model:m{i}", decision="allow", outcome="200",
                                  details={"i": i}))
    with sqlite3.connect(StateDir(home).db) as raw:  # an attacker with the database file
        if tamper == "delete":
            raw.execute("DELETE FROM audit_records WHERE seq = 37")
        elif tamper == "edit":
            raw.execute("UPDATE audit_records SET decision = 'deny' WHERE seq = 37")
        else:  # swap the contents of 37 and 38, keeping each digest in its place
            a, b = (raw.execute("SELECT resource, details FROM audit_records WHERE seq = ?",
                                (s,)).fetchone() for s in (37, 38))
            raw.execute("UPDATE audit_records SET resource = ?, details = ? WHERE seq = 37", b)
            raw.execute("UPDATE audit_records SET resource = ?, details = ? WHERE seq = 38", a)
    store, device = _enrolled_controller(tmp_path, home)
    _ship(home, store, device, Outbox(db, quotas={}, alarms={}))
    result, _forks = store.audit_verify(device)
    assert not result.ok and result.first_bad_seq == 37, result.line()
    assert reason in result.reason
    db.close()


def test_an_untampered_log_verifies_and_a_rewrite_after_shipping_is_a_fork(
    tmp_path: Path,
) -> None:
    home = tmp_path / "device"
    db = open_database(StateDir(home).db)
    with AuditLog(db, load_or_create_device_key(home), checkpoint_every=10) as log:
        for i in range(30):
            log.append(AuditEntry(subject="s", action="a", resource=f"r{i}", decision="allow",
                                  outcome="ok"))
    store, device = _enrolled_controller(tmp_path, home)
    outbox = Outbox(db, quotas={}, alarms={})
    _ship(home, store, device, outbox)
    result, forks = store.audit_verify(device)
    assert result.ok and result.records == 30 and result.signed_through == 30 and not forks
    with sqlite3.connect(StateDir(home).db) as raw:  # rewritten after it was shipped
        raw.execute("UPDATE audit_records SET digest = ? WHERE seq = 12", ("ab" * 32,))
    _ship(home, store, device, outbox)  # shipped again (a redelivery)
    result, forks = store.audit_verify(device)
    assert not result.ok and result.first_bad_seq == 12 and "twice" in result.reason
    assert forks[0]["seq"] == 12
    db.close()


# -- jobs ---------------------------------------------------------------------------------


def test_a_job_missed_for_a_week_runs_once_then_keeps_its_period() -> None:
    async def main() -> tuple[int, float | None]:
        jobs = Jobs()
        ran = asyncio.Event()
        count = 0

        async def job() -> None:
            nonlocal count
            count += 1
            ran.set()

        # Due for a week of hourly runs: 168 missed periods.
        jobs.add("hourly", "hourly job", 3600, job, first_in=-7 * 24 * 3600)
        jobs.start()
        try:
            await asyncio.wait_for(ran.wait(), 10)
            info = {i.id: i for i in jobs.info()}["hourly"]
            return count, info.next_run
        finally:
            await jobs.stop()

    count, next_run = asyncio.run(main())
    assert count == 1
    assert next_run is not None and next_run > time.time() + 3000


def test_stop_waits_for_a_running_job_and_cancels_it_after_the_grace() -> None:
    async def main() -> list[str]:
        jobs = Jobs()
        started = asyncio.Event()
        events: list[str] = []

        async def slow() -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # never finishes by itself
            except asyncio.CancelledError:
                events.append("cancelled")
                raise

        jobs.add("slow", "slow job", 3600, slow, first_in=0)
        jobs.start()
        await asyncio.wait_for(started.wait(), 10)
        await jobs.stop(grace=0.2)
        events.append("stopped")
        info = jobs.info()[0]
        events.append(str(info.last_error))
        return events

    assert asyncio.run(main()) == ["cancelled", "stopped", "cancelled at stop"]


# -- the protocol -------------------------------------------------------------------------


def test_docs_protocol_md_carries_every_messages_schema() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert schema.BEGIN in doc and schema.END in doc
    section = doc.split(schema.BEGIN, 1)[1].split(schema.END, 1)[0]
    assert section.strip() == schema.generated().strip(), (
        "docs/protocol.md is out of date: run `python -m fleet.schema docs/protocol.md`")


def test_a_telemetry_snapshot_names_only_aliases_the_protocol_accepts(tmp_path: Path) -> None:
    """A deployment's smoke test generates under the residency key "ALIAS#deploy": its
    series must not reach the snapshot, whose model names the controller validates (one
    such key made it reject the whole batch)."""
    from agent.metrics import Metrics
    from agent.sync.telemetry import snapshot

    metrics = Metrics()
    for key in ("smol", "smol#deploy"):
        metrics.tokens_generated.labels(model=key).inc(5)
    snap = snapshot(metrics, boot="b1", started=time.time(), loaded={"smol#deploy": 0},
                    home=tmp_path, backlog={})
    assert set(snap["models"]) == {"smol"}
    assert messages.TelemetrySnapshot.model_validate(snap).models["smol"].tokens_generated == 5
