"""The outbox: what the device owes the controller, by class, on disk, in order.

Classes, in flush priority:

- `deploy` and `telemetry`: rows in `sync_outbox`, appended with `append()` inside the
  transaction of what they report. Telemetry has a byte quota: past it the oldest rows are
  dropped in the same transaction and the count is kept (`dropped:telemetry`) until a batch
  carrying it is acknowledged. Deploy status is never dropped; past its alarm size the
  outbox says so (`alarms()`), and the rows stay.
- `audit` and `events`: not copied. The audit log and the model history are their own
  outbox; `cursor:<class>` in `sync_state` is the highest id the controller acknowledged.
  Audit is never dropped and pruning stops at the cursor (agent.security.audit_verify).

A batch is acknowledged when the broker's PUBACK for its message arrives; only then are
its rows deleted (or its cursor advanced), in one transaction, so a crash at any point
loses nothing and resends at most the batches in flight. Each row carries a CRC32 of its
body: a row that fails it (or does not parse) is moved to `sync_quarantine`, reported,
and kept, never deleted silently.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sqlalchemy import Connection

from localdb import Database

Cls = Literal["deploy", "audit", "events", "telemetry"]
CLASSES: Final[tuple[Cls, ...]] = ("deploy", "audit", "events", "telemetry")
ROW_CLASSES: Final = frozenset({"deploy", "telemetry"})
DROPPABLE: Final = frozenset({"telemetry"})

_INSERT = "INSERT INTO sync_outbox (cls, created, body, size, \"check\") VALUES (?, ?, ?, ?, ?)"
_ADD = ("INSERT INTO sync_state (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value")
_GET = "SELECT value FROM sync_state WHERE key = ?"
_SET = ("INSERT INTO sync_state (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
_AUDIT_COLS = ("seq, time, subject, uid, pid, action, resource, decision, outcome, details, "
               "digest")


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _crc(text: str) -> str:
    return format(zlib.crc32(text.encode("utf-8")), "08x")


@dataclass
class Batch:
    """Records of one class, consecutive by id, ready to publish."""

    cls: Cls
    first: int  # first id (seq for audit)
    last: int  # last id
    records: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # audit only
    dropped: int = 0  # telemetry: drops reported by this batch
    rows: int = 0  # outbox rows it removes when acknowledged
    size: int = 0  # their bytes

    def payload(self, device: str) -> dict[str, Any]:
        body: dict[str, Any] = {"v": 1, "device": device, "records": self.records}
        if self.cls == "audit":
            body["checkpoints"] = self.checkpoints
        if self.cls == "telemetry":
            body["dropped"] = self.dropped
        return body


@dataclass(frozen=True, slots=True)
class Quarantined:
    outbox_id: int
    cls: str
    reason: str


class Outbox:
    """Appends, batches, acknowledgements and quotas over the device database."""

    def __init__(
        self,
        db: Database,
        *,
        quotas: Mapping[str, int],
        alarms: Mapping[str, int],
        clock: Callable[[], float] = time.time,
        on_quarantine: Callable[[Sequence[Quarantined]], None] | None = None,
    ) -> None:
        self.db = db
        self._quotas = dict(quotas)
        self._alarms = dict(alarms)
        self._clock = clock
        self._on_quarantine = on_quarantine

    # -- writing -----------------------------------------------------------------------

    def append(self, conn: Connection, cls: Cls, body: Mapping[str, Any]) -> int:
        """Add one record inside the caller's transaction (`Database.write_connection()`),
        so it is stored exactly when what it reports is; returns its id. A droppable class
        over its quota loses its oldest rows here, counted."""
        if cls not in ROW_CLASSES:
            raise ValueError(f"{cls} records are not copied into the outbox")
        text = _compact(body)
        size = len(text.encode("utf-8"))
        raw = conn.connection.driver_connection
        assert raw is not None
        cur = raw.execute(_INSERT, (cls, self._clock(), text, size, _crc(text)))
        rowid = int(cur.lastrowid or 0)
        quota = self._quotas.get(cls)
        if quota is not None and cls in DROPPABLE:
            # A running byte count, in the same transaction: the quota check reads one row
            # instead of summing the class (classes without a quota pay nothing for it).
            raw.execute(_ADD, (f"bytes:{cls}", size))
            total = raw.execute(_GET, (f"bytes:{cls}",)).fetchone()[0]
            if total > quota:
                self._drop_oldest(raw, cls, total - quota)
        return rowid

    def add(self, cls: Cls, body: Mapping[str, Any]) -> int:
        """`append` in a transaction of its own."""
        with self.db.write_connection() as conn:
            return self.append(conn, cls, body)

    @staticmethod
    def _drop_oldest(raw: Any, cls: str, excess: int) -> None:
        freed = dropped = 0
        last = None
        for rid, size in raw.execute(
            "SELECT id, size FROM sync_outbox WHERE cls = ? ORDER BY id", (cls,)
        ):
            if freed >= excess:
                break
            freed += size
            dropped += 1
            last = rid
        if last is None:
            return
        raw.execute("DELETE FROM sync_outbox WHERE cls = ? AND id <= ?", (cls, last))
        raw.execute(_ADD, (f"bytes:{cls}", -freed))
        raw.execute(_ADD, (f"dropped:{cls}", dropped))

    # -- reading -----------------------------------------------------------------------

    def batch(self, cls: Cls, after: int | None, limit: int) -> Batch | None:
        """The next records of `cls` after id `after` (None: after what was acknowledged)."""
        if cls in ROW_CLASSES:
            return self._row_batch(cls, after, limit)
        if after is None:
            after = self.cursor(cls)
        if cls == "audit":
            return self._audit_batch(after, limit)
        return self._event_batch(after, limit)

    def cursor(self, cls: str) -> int:
        with self.db.point_read() as raw:
            row = raw.execute(_GET, (f"cursor:{cls}",)).fetchone()
        return int(row[0]) if row else 0

    def _row_batch(self, cls: Cls, after: int | None, limit: int) -> Batch | None:
        bad: list[tuple[int, str, float, str, str]] = []
        with self.db.read_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            rows = raw.execute(
                "SELECT id, created, body, size, \"check\" FROM sync_outbox "
                "WHERE cls = ? AND id > ? ORDER BY id LIMIT ?", (cls, after or 0, limit),
            ).fetchall()
            dropped = 0
            if cls in DROPPABLE:
                got = raw.execute(_GET, (f"dropped:{cls}",)).fetchone()
                dropped = int(got[0]) if got else 0
        records: list[dict[str, Any]] = []
        size = 0
        for rid, created, body, rsize, check in rows:
            try:
                if _crc(body) != check:
                    raise ValueError("its CRC32 does not match its body")
                record = json.loads(body)
                if not isinstance(record, dict):
                    raise ValueError("its body is not a JSON object")
            except ValueError as exc:
                bad.append((rid, cls, created, body, str(exc)))
                continue
            records.append({"id": rid, "time": created, **record})
            size += rsize
        if bad:
            self._quarantine(bad)
        if not rows:
            return None
        first, last = rows[0][0], rows[-1][0]
        return Batch(cls, first, last, records, dropped=dropped, rows=len(rows), size=size)

    def _quarantine(self, bad: Iterable[tuple[int, str, float, str, str]]) -> None:
        now = self._clock()
        found = list(bad)
        with self.db.write_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            for rid, cls, created, body, reason in found:
                raw.execute(
                    "INSERT INTO sync_quarantine (outbox_id, cls, created, body, reason, "
                    "moved_at) VALUES (?, ?, ?, ?, ?, ?)", (rid, cls, created, body, reason, now),
                )
                size = raw.execute("SELECT size FROM sync_outbox WHERE id = ?",
                                   (rid,)).fetchone()
                raw.execute("DELETE FROM sync_outbox WHERE id = ?", (rid,))
                if size and cls in DROPPABLE:
                    raw.execute(_ADD, (f"bytes:{cls}", -int(size[0])))
        if self._on_quarantine is not None:
            self._on_quarantine([Quarantined(r[0], r[1], r[4]) for r in found])

    def _audit_batch(self, after: int, limit: int) -> Batch | None:
        with self.db.read_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            rows = raw.execute(
                f"SELECT {_AUDIT_COLS} FROM audit_records WHERE seq > ? "  # noqa: S608
                "ORDER BY seq LIMIT ?", (after, limit),
            ).fetchall()
            if not rows:
                return None
            cp_after = raw.execute(_GET, ("cursor:checkpoint",)).fetchone()
            cps = raw.execute(
                "SELECT id, seq, digest, time, key_id, signature FROM audit_checkpoints "
                "WHERE id > ? AND seq <= ? ORDER BY id", (cp_after[0] if cp_after else 0,
                                                          rows[-1][0]),
            ).fetchall()
        names = [c.strip() for c in _AUDIT_COLS.split(",")]
        records = []
        for row in rows:
            rec = dict(zip(names, row, strict=True))
            rec["details"] = json.loads(rec["details"]) if isinstance(rec["details"], str) \
                else rec["details"]
            records.append(rec)
        checkpoints = [dict(zip(("id", "seq", "digest", "time", "key_id", "signature"), c,
                                strict=True)) for c in cps]
        return Batch("audit", rows[0][0], rows[-1][0], records, checkpoints=checkpoints)

    def _event_batch(self, after: int, limit: int) -> Batch | None:
        with self.db.read_connection() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, time, alias, kind, details FROM model_events WHERE id > ? "
                "ORDER BY id LIMIT ?", (after, limit),
            ).fetchall()
        if not rows:
            return None
        records = []
        for rid, when, alias, kind, details in rows:
            stamp = when if isinstance(when, int | float) else _unix(when)
            records.append({"id": rid, "time": stamp, "alias": alias, "kind": kind,
                            "details": json.loads(details) if isinstance(details, str)
                            else details})
        return Batch("events", rows[0][0], rows[-1][0], records)

    # -- acknowledgements -------------------------------------------------------------

    def ack(self, batches: Sequence[Batch]) -> None:
        """The broker has these batches (in order): forget them, in one transaction."""
        if not batches:
            return
        with self.db.write_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            for b in batches:
                if b.cls in ROW_CLASSES:
                    if b.cls in DROPPABLE:
                        freed = raw.execute(
                            "SELECT COALESCE(SUM(size), 0) FROM sync_outbox "
                            "WHERE cls = ? AND id BETWEEN ? AND ?", (b.cls, b.first, b.last),
                        ).fetchone()[0]
                        raw.execute(_ADD, (f"bytes:{b.cls}", -int(freed)))
                    raw.execute("DELETE FROM sync_outbox WHERE cls = ? AND id BETWEEN ? AND ?",
                                (b.cls, b.first, b.last))
                    if b.dropped:
                        raw.execute(_ADD, (f"dropped:{b.cls}", -b.dropped))
                else:
                    raw.execute(_SET, (f"cursor:{b.cls}", max(b.last, self._get(raw, b.cls))))
                    if b.checkpoints:
                        top = max(c["id"] for c in b.checkpoints)
                        raw.execute(_SET, ("cursor:checkpoint",
                                           max(top, self._get(raw, "checkpoint"))))

    @staticmethod
    def _get(raw: Any, cls: str) -> int:
        row = raw.execute(_GET, (f"cursor:{cls}",)).fetchone()
        return int(row[0]) if row else 0

    # -- accounting -------------------------------------------------------------------

    def backlog(self) -> dict[str, int]:
        """Records waiting per class."""
        out: dict[str, int] = {}
        with self.db.read_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            for cls, n in raw.execute("SELECT cls, COUNT(*) FROM sync_outbox GROUP BY cls"):
                out[cls] = int(n)
            audit = raw.execute(
                "SELECT COUNT(*) FROM audit_records WHERE seq > COALESCE((SELECT value FROM "
                "sync_state WHERE key = 'cursor:audit'), 0)").fetchone()[0]
            events = raw.execute(
                "SELECT COUNT(*) FROM model_events WHERE id > COALESCE((SELECT value FROM "
                "sync_state WHERE key = 'cursor:events'), 0)").fetchone()[0]
        out["audit"] = int(audit)
        out["events"] = int(events)
        return {cls: out.get(cls, 0) for cls in CLASSES}

    def sizes(self) -> dict[str, int]:
        """Bytes waiting: exact for outbox rows (a running count for classes with a quota,
        a sum for the others), an estimate for audit (its stored text)."""
        with self.db.read_connection() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            out = {cls: int(n) for cls, n in raw.execute(
                "SELECT cls, SUM(size) FROM sync_outbox GROUP BY cls") if cls not in DROPPABLE}
            out.update({k.removeprefix("bytes:"): int(v) for k, v in raw.execute(
                "SELECT key, value FROM sync_state WHERE key LIKE 'bytes:%'")})
            out["audit"] = int(raw.execute(
                "SELECT COALESCE(SUM(LENGTH(details) + LENGTH(subject) + LENGTH(resource) + "
                "160), 0) FROM audit_records WHERE seq > COALESCE((SELECT value FROM "
                "sync_state WHERE key = 'cursor:audit'), 0)").fetchone()[0])
        return out

    def dropped(self) -> dict[str, int]:
        """Records dropped over quota and not yet reported to the controller."""
        with self.db.read_connection() as conn:
            rows = conn.exec_driver_sql(
                "SELECT key, value FROM sync_state WHERE key LIKE 'dropped:%'").fetchall()
        return {k.removeprefix("dropped:"): int(v) for k, v in rows}

    def alarms(self) -> dict[str, str]:
        """Classes that are never dropped and have grown past their alarm size."""
        sizes = self.sizes()
        return {
            cls: f"{sizes.get(cls, 0)} bytes waiting, alarm at {limit}"
            for cls, limit in self._alarms.items() if sizes.get(cls, 0) > limit
        }

    def quarantined(self) -> int:
        with self.db.read_connection() as conn:
            return int(conn.exec_driver_sql("SELECT COUNT(*) FROM sync_quarantine").scalar() or 0)


def _unix(value: Any) -> float:
    from datetime import UTC, datetime

    when = datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
