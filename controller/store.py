"""What the controller does with each message: validate, check it comes from an approved
device under its own topic, and store it idempotently; and the reads behind `fleet
status`, `telemetry tail` and `audit verify`.

Online/offline comes from the retained birth and the last will, told apart by boot id: an
"offline" whose boot is not the device's current session is a stale will and changes
nothing; an "online" older than what is known is ignored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, select, update

from controller.db import insert_ignore, upsert_add
from controller.pki import Approved
from controller.tables import (
    AuditCheckpoint,
    AuditConflict,
    AuditRecord,
    DeployStep,
    Device,
    Event,
    Ingested,
    Telemetry,
    TelemetryDrop,
)
from fleet import messages as m
from fleet.auditchain import (
    Checkpoint,
    Record,
    VerifyResult,
    canonical_json,
    ed25519_public_key,
    verify_chain,
)

log = logging.getLogger(__name__)


class Rejected(ValueError):
    """A message the controller will not store; the reason is logged, not stored."""


@dataclass(frozen=True, slots=True)
class Stored:
    kind: str
    records: int
    first: int | None = None  # the batch's first and last record id (seq for audit), for
    last: int | None = None  # the confirmation that lets the device release it


class FleetStore:
    """The fleet's state over one engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, worker: str = "cli") -> None:
        self.engine = engine
        self.worker = worker
        self._known: dict[str, str] = {}  # device -> fleet, of approved devices

    # -- approvals --------------------------------------------------------------------

    def add_device(self, a: Approved) -> None:
        row = {"device_id": a.device_id, "fleet": a.fleet, "audit_key": a.audit_key,
               "cert_serial": a.serial, "cert_not_after": a.not_after.timestamp(),
               "approved_at": time.time(), "online": False}
        with self.engine.begin() as conn:
            exists = conn.execute(select(Device.device_id).where(
                Device.device_id == a.device_id)).first()
            if exists:
                conn.execute(update(Device).where(Device.device_id == a.device_id).values(
                    audit_key=a.audit_key, cert_serial=a.serial,
                    cert_not_after=row["cert_not_after"]))
            else:
                conn.execute(_t(Device).insert(), [row])

    def _fleet_of(self, device: str) -> str | None:
        fleet = self._known.get(device)
        if fleet is None:
            with self.engine.connect() as conn:
                got = conn.execute(select(Device.fleet).where(Device.device_id == device)).first()
            if got is not None:
                fleet = self._known[device] = got[0]
        return fleet

    # -- ingest -----------------------------------------------------------------------

    def handle(self, fleet: str, device: str, kind: str, payload: bytes,
               conn: Connection | None = None) -> Stored:
        """Store one message from `<fleet>/<device>/<kind>` in `conn`'s transaction (or a
        transaction of its own); raises Rejected before writing anything."""
        if self._fleet_of(device) != fleet:
            raise Rejected(f"{device} is not an approved device of fleet {fleet}")
        model = m.MESSAGES.get(kind)
        handler = getattr(self, f"_{kind}", None)
        if model is None or handler is None or kind == "cmd":
            raise Rejected(f"nothing to store for {kind!r}")
        try:
            msg = m.decode(model, payload)
        except ValueError as exc:
            raise Rejected(f"invalid {kind} message from {device}: {str(exc)[:300]}") from exc
        if getattr(msg, "device", device) != device:
            raise Rejected(f"{kind} message on {device}'s topic names another device")
        if conn is None:
            with self.engine.begin() as own:
                n: int = handler(own, device, msg)
                self.count(own, {kind: (1, n)})
        else:
            n = handler(conn, device, msg)
        ids = [getattr(r, "seq", None) or r.id for r in getattr(msg, "records", [])]
        return Stored(kind, n, min(ids) if ids else None, max(ids) if ids else None)

    def count(self, conn: Connection, counts: dict[str, tuple[int, int]]) -> None:
        """Add (messages, records) per kind to this worker's counters."""
        for kind, (messages, records) in counts.items():
            upsert_add(conn, _t(Ingested), {"worker": self.worker, "kind": kind,
                                            "messages": messages, "records": records},
                       ["worker", "kind"], ["messages", "records"])

    def _status(self, conn: Connection, device: str, msg: m.Status) -> int:
        dev = conn.execute(select(Device.boot, Device.status_time).where(
            Device.device_id == device)).one()
        if msg.state == "online":
            if dev.status_time is not None and msg.time < dev.status_time:
                return 0  # an older birth, delivered late
            values: dict[str, Any] = {"online": True, "boot": msg.boot,
                                      "status_time": msg.time,
                                      "agent_version": msg.agent_version}
        elif msg.boot == dev.boot:
            values = {"online": False, "status_time": max(msg.time, dev.status_time or 0)}
        else:
            return 0  # a will from an earlier session: not about the current one
        conn.execute(update(Device).where(Device.device_id == device).values(
            last_seen=_now_max(msg.time), **values))
        return 1

    def _heartbeat(self, conn: Connection, device: str, msg: m.Heartbeat) -> int:
        conn.execute(update(Device).where(Device.device_id == device).values(
            last_seen=_now_max(msg.time), backlog=msg.backlog))
        return 1

    def _reported(self, conn: Connection, device: str, msg: m.Reported) -> int:
        conn.execute(update(Device).where(
            (Device.device_id == device)
            & ((Device.reported_time.is_(None)) | (Device.reported_time <= msg.time))
        ).values(reported=json.loads(msg.model_dump_json()), reported_time=msg.time,
                 agent_version=msg.agent_version))
        return 1

    def _telemetry(self, conn: Connection, device: str, msg: m.TelemetryBatch) -> int:
        rows = [{"device_id": device, "record_id": r.id, "time": r.time,
                 "body": json.loads(r.snapshot.model_dump_json())} for r in msg.records]
        insert_ignore(conn, _t(Telemetry), rows, ["device_id", "record_id"])
        if msg.dropped and msg.records:
            insert_ignore(conn, _t(TelemetryDrop),
                          [{"device_id": device, "first_record": msg.records[0].id,
                            "dropped": msg.dropped}], ["device_id", "first_record"])
        # No device-row update here: two workers committing telemetry of the same devices
        # would queue on (or deadlock over) those rows. Heartbeats keep `last_seen`.
        return len(rows)

    def _events(self, conn: Connection, device: str, msg: m.EventBatch) -> int:
        rows = [{"device_id": device, "record_id": r.id, "time": r.time, "alias": r.alias,
                 "kind": r.kind, "details": r.details} for r in msg.records]
        insert_ignore(conn, _t(Event), rows, ["device_id", "record_id"])
        return len(rows)

    def _audit(self, conn: Connection, device: str, msg: m.AuditBatch) -> int:
        rows: list[dict[str, Any]] = [
                {"device_id": device, "seq": r.seq, "time": r.time, "subject": r.subject,
                 "uid": r.uid, "pid": r.pid, "action": r.action, "resource": r.resource,
                 "decision": r.decision, "outcome": r.outcome,
                 "details": canonical_json(r.details), "digest": r.digest}
                for r in msg.records]
        cps = [{"device_id": device, "cp_id": c.id, "seq": c.seq, "digest": c.digest,
                "time": c.time, "key_id": c.key_id, "signature": c.signature}
               for c in msg.checkpoints]
        insert_ignore(conn, _t(AuditRecord), rows, ["device_id", "seq"])
        insert_ignore(conn, _t(AuditCheckpoint), cps, ["device_id", "cp_id"])
        if rows:
            seqs = [r["seq"] for r in rows]
            stored = dict(conn.execute(select(AuditRecord.seq, AuditRecord.digest).where(
                (AuditRecord.device_id == device) & AuditRecord.seq.in_(seqs))).all())
            now = time.time()
            conflicts = [{"device_id": device, "seq": r["seq"], "stored_digest":
                          stored[r["seq"]], "received_digest": r["digest"],
                          "received_at": now}
                         for r in rows if stored.get(r["seq"], r["digest"]) != r["digest"]]
            insert_ignore(conn, _t(AuditConflict), conflicts,
                          ["device_id", "seq", "received_digest"])
        return len(rows)

    def _deploy(self, conn: Connection, device: str, msg: m.DeployBatch) -> int:
        rows = [{"device_id": device, "record_id": r.id, "deployment": r.status.deployment,
                 "version": r.status.version, "step": r.status.step, "model": r.status.model,
                 "variant": r.status.variant, "percent": r.status.percent,
                 "reason": r.status.reason, "bytes_moved": r.status.bytes_moved,
                 "time": r.status.time} for r in msg.records]
        insert_ignore(conn, _t(DeployStep), rows, ["device_id", "record_id"])
        return len(rows)

    def _response(self, conn: Connection, device: str, msg: m.CommandResult) -> int:
        log.info("command %s on %s: %s", msg.name, device, "ok" if msg.ok else msg.error)
        return 1

    # -- reads ------------------------------------------------------------------------

    def fleet_status(self) -> list[dict[str, Any]]:
        out = []
        with self.engine.connect() as conn:
            devices = conn.execute(select(Device).order_by(Device.device_id)).all()
            for d in devices:
                reported = d.reported or {}
                out.append({
                    "device": d.device_id, "fleet": d.fleet,
                    "state": "online" if d.online else "offline", "boot": d.boot,
                    "last_seen": d.last_seen, "agent_version": d.agent_version,
                    "models": [mm.get("alias") for mm in reported.get("models", [])],
                    "active": {mm.get("alias"): mm.get("active")
                               for mm in reported.get("models", []) if mm.get("active")},
                    "backlog": d.backlog, "cert_not_after": d.cert_not_after,
                    "telemetry_records": conn.execute(
                        select(Telemetry.id).where(Telemetry.device_id == d.device_id)
                        .with_only_columns(_count())).scalar(),
                    "reported": reported,
                })
        return out

    def telemetry_tail(self, device: str, n: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Telemetry.record_id, Telemetry.time, Telemetry.body)
                .where(Telemetry.device_id == device).order_by(Telemetry.record_id.desc())
                .limit(n)).all()
        return [{"id": r.record_id, "time": r.time, "snapshot": r.body} for r in reversed(rows)]

    def audit_verify(self, device: str) -> tuple[VerifyResult, list[dict[str, Any]]]:
        """The device's shipped chain checked with its pinned audit key, and any forks."""
        import base64

        with self.engine.connect() as conn:
            key = conn.execute(select(Device.audit_key).where(
                Device.device_id == device)).scalar()
            if key is None:
                raise Rejected(f"no approved device {device!r}")
            recs = conn.execute(select(AuditRecord).where(AuditRecord.device_id == device)
                                .order_by(AuditRecord.seq)).all()
            cps = conn.execute(select(AuditCheckpoint).where(
                AuditCheckpoint.device_id == device).order_by(AuditCheckpoint.seq,
                                                              AuditCheckpoint.cp_id)).all()
            conflicts = conn.execute(select(AuditConflict).where(
                AuditConflict.device_id == device).order_by(AuditConflict.seq)).all()
        pub = ed25519_public_key(base64.b64decode(key))
        records = (Record(seq=r.seq, time=r.time, subject=r.subject, uid=r.uid, pid=r.pid,
                          action=r.action, resource=r.resource, decision=r.decision,
                          outcome=r.outcome, details=json.loads(r.details), digest=r.digest)
                   for r in recs)
        checkpoints = [Checkpoint(seq=c.seq, digest=c.digest, time=c.time, key_id=c.key_id,
                                  signature=c.signature) for c in cps]
        result = verify_chain(records, checkpoints, pub, anchor=None)
        forks = [{"seq": c.seq, "stored": c.stored_digest, "received": c.received_digest}
                 for c in conflicts]
        if forks and (result.ok or forks[0]["seq"] < (result.first_bad_seq or 0)):
            first = forks[0]["seq"]
            result = VerifyResult(False, first, f"record {first} was received twice with "
                                  "different contents (the log forked or was edited after "
                                  "shipping)", result.records, result.checkpoints,
                                  result.first_seq, result.last_seq, result.signed_through)
        return result, forks

    def ingest_counts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(
                Ingested.worker, Ingested.kind, Ingested.messages, Ingested.records))]


def _t(table_class: Any) -> Table:
    """The Core table of a mapped class (typed, for the insert helpers)."""
    table: Table = table_class.__table__
    return table


def _now_max(seen: float) -> Any:
    """`last_seen`, never moved backwards."""
    from sqlalchemy import case

    return case((Device.last_seen.is_(None), seen),
                (Device.last_seen < seen, seen), else_=Device.last_seen)


def _count() -> Any:
    from sqlalchemy import func

    return func.count()
