"""The audit log: append-only, hash-chained records and signed checkpoints in the registry DB.

Each record's `digest` is sha256 over the previous digest and the record's canonical JSON,
so editing, deleting, inserting or reordering a stored record breaks the chain from that
seq on. Every `checkpoint_every` records or `checkpoint_seconds` (and on close) the device
key signs `"<seq>:<digest>"`, so the chain cannot be rebuilt without the key and a pruned
prefix is vouched for by the checkpoint it ends at. docs/audit.md gives the exact bytes.

Writing: `AuditLog.append()` only puts the entry on an in-memory queue (O(1), never
touches the DB, safe from any thread); one named daemon thread, "audit-writer", drains it
in batches, one BEGIN IMMEDIATE transaction each. A thread rather than an asyncio task
because callers are both sync (CLI, runtime workers) and async (the API). `flush()` is
the synchronisation point: it returns once everything appended before it is committed.

Reading (`tail`, `query`, ...) uses one deferred read transaction on a raw connection: a
consistent WAL snapshot that never blocks the writer. Verification, pruning and export
are in `agent.security.audit_verify`.

Errors: the `TokenError`/`AuditError`/`DeviceKeyError` branches of `agent.errors`.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from sqlalchemy import Connection

from agent.errors import AuditClosedError, AuditError, AuditUnavailable
from agent.security.audit_head import Head, read_heads, record_heads
from agent.security.identity import Subject
from agent.security.keys import DeviceKey, LazyDeviceKey
from agent.security.tables import AuditCheckpoint, AuditRecord
from fleet.auditchain import CHECKPOINT_FIELDS as _CHECKPOINT_COLS
from fleet.auditchain import (
    GENESIS,
    Checkpoint,
    Record,
    VerifyResult,
    canonical_json,
    checkpoint_message,
    record_digest,
)
from fleet.auditchain import RECORD_FIELDS as _RECORD_COLS
from localdb import Database

if TYPE_CHECKING:  # cryptography is imported by agent.security.keys when a key is first used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    PublicKeyLike = bytes | str | Ed25519PublicKey | DeviceKey

__all__ = [
    "FORBIDDEN_DETAIL_KEYS",
    "GENESIS",
    "AuditClosedError",
    "AuditEntry",
    "AuditError",
    "AuditFn",
    "AuditLog",
    "AuditUnavailable",
    "Checkpoint",
    "Record",
    "VerifyResult",
    "audit_entry",
    "audit_recorder",
    "canonical_json",
    "checkpoint_message",
    "checkpoints",
    "format_time",
    "get_record",
    "query",
    "record_digest",
    "tail",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT: Final = "edge-agent-audit/1"
DECISIONS: Final = frozenset({"allow", "deny"})
# Keys that would carry prompt or completion text; removed (at any depth) before storing.
# Keys ending in "_text" are removed too. Token counts ("prompt_tokens") are fine.
FORBIDDEN_DETAIL_KEYS: Final = frozenset({
    "prompt", "prompts", "messages", "message", "content", "contents", "text", "texts",
    "completion", "completions", "choices", "delta", "input", "inputs", "output", "outputs",
    "response", "suffix", "system", "system_prompt", "instructions", "documents",
})

_RECORD_TABLE: Final = AuditRecord.__tablename__
_CHECKPOINT_TABLE: Final = AuditCheckpoint.__tablename__
_SELECT_RECORDS: Final = f"SELECT {', '.join(_RECORD_COLS)} FROM {_RECORD_TABLE}"  # noqa: S608
_SELECT_CHECKPOINTS: Final = (
    f"SELECT {', '.join(_CHECKPOINT_COLS)} FROM {_CHECKPOINT_TABLE}"  # noqa: S608
)
_INSERT_RECORDS: Final = (
    f"INSERT INTO {_RECORD_TABLE} ({', '.join(_RECORD_COLS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * len(_RECORD_COLS))})"
)
_INSERT_CHECKPOINTS: Final = (
    f"INSERT INTO {_CHECKPOINT_TABLE} ({', '.join(_CHECKPOINT_COLS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * len(_CHECKPOINT_COLS))})"
)
_INVALID_DETAILS: Final = '{"_invalid":"details were not JSON-serialisable"}'
_FETCH: Final = 2000


# --- the record format ------------------------------------------------------------------


def format_time(when: datetime) -> str:
    """ISO 8601 UTC with microseconds and a Z, fixed width so strings sort by time."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _format_ns(ns: int) -> str:
    sec, rem = divmod(ns, 1_000_000_000)
    return format_time(datetime.fromtimestamp(sec, UTC).replace(microsecond=rem // 1000))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What a caller audits; seq, time and digest are added by the writer.

    `details` must never carry prompt or completion text: keys in FORBIDDEN_DETAIL_KEYS
    (or ending in "_text") are stripped before storing, and their names listed under
    "_redacted".
    """

    subject: str
    action: str
    resource: str
    decision: str
    outcome: str | int
    uid: int | None = None
    pid: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"audit decision must be 'allow' or 'deny', not {self.decision!r}")


class AuditFn(Protocol):
    """Records one decision. Must be quick and must not raise (errors are only logged).

    `subject` is a `Subject`, a name for callers that are not subjects ("signal:SIGHUP"),
    or None when a request presented a token that failed; `decision` is "allow" or
    "deny"; `outcome` is a label ("ok", "denied", "unauthenticated", ...) unless
    `details` carries an HTTP status, which then is the outcome.
    """

    def __call__(self, subject: Subject | str | None, action: str, resource: str,
                 decision: str, outcome: str, details: dict[str, Any]) -> None: ...


def audit_entry(
    subject: Subject | str | None,
    action: str,
    resource: str,
    decision: str,
    outcome: str,
    details: Mapping[str, Any],
) -> AuditEntry:
    """The one place an audit entry is built, for the API, the CLI and signals alike."""
    if isinstance(subject, Subject):
        name, uid, pid = subject.display, subject.uid, subject.pid
    else:
        name, uid, pid = subject or "anonymous", None, None
    return AuditEntry(
        subject=name, uid=uid, pid=pid, action=action, resource=resource, decision=decision,
        outcome=str(details.get("status", outcome)), details=details,
    )


def audit_recorder(log: AuditLog) -> AuditFn:
    """An `AuditFn` that appends to `log` (what the daemon and the CLI record through)."""

    def record(subject: Subject | str | None, action: str, resource: str, decision: str,
               outcome: str, details: dict[str, Any]) -> None:
        log.append(audit_entry(subject, action, resource, decision, outcome, details))

    return record


def _forbidden(key: str) -> bool:
    low = key.lower()
    return low in FORBIDDEN_DETAIL_KEYS or low.endswith("_text")


def _scrub(value: Any, redacted: set[str]) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if _forbidden(key):
                redacted.add(key)
            else:
                out[key] = _scrub(v, redacted)
        return out
    if isinstance(value, list | tuple):
        return [_scrub(v, redacted) for v in value]
    return value


def _details_json(details: Mapping[str, Any]) -> str:
    redacted: set[str] = set()
    try:
        clean = _scrub(details, redacted)
        if redacted:
            clean["_redacted"] = sorted(redacted)
        text = json.dumps(
            clean, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
            allow_nan=False,
        )
    except (TypeError, ValueError, RecursionError):
        return _INVALID_DETAILS
    if not text.isascii():
        # Lone surrogates cannot be stored or hashed as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _safe_str(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _safe_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None  # SQLite INTEGER is 64-bit; a bool is not a uid


# --- the writer ---------------------------------------------------------------------------


class _Flush:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None


class _Stop:
    __slots__ = ()


_STOP: Final = _Stop()
_QueueItem = tuple[int, AuditEntry] | _Flush | _Stop


class AuditLog:
    """Appends audit records through a background writer thread; see the module docstring.

    Use as a context manager, or call `close()` (idempotent) on shutdown.
    """

    def __init__(
        self,
        db: Database,
        key: DeviceKey | LazyDeviceKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 300,
        checkpoint_on_close: bool = True,
        max_batch: int = 5000,
        clock: Callable[[], float] = time.monotonic,
        head_file: Path | None = None,
        max_pending: int = 10_000,
        max_retries: int = 5,
        retry_seconds: float = 30.0,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if checkpoint_seconds <= 0 or math.isnan(checkpoint_seconds):
            raise ValueError("checkpoint_seconds must be positive")
        self._db = db
        self._key = key
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._on_close = checkpoint_on_close
        self._max_batch = max(1, max_batch)
        self._head_file = head_file  # where signed heads are recorded outside the DB
        # Records appended but not committed, bounded: past max_pending new audited work is
        # refused (`refusing`), past twice that append() itself refuses (see append()).
        self._max_pending = max(1, max_pending)
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._max_retries = max(1, max_retries)
        self._retry_seconds = retry_seconds
        self._unhealthy: str | None = None  # why the writer cannot write, once retries ran out
        self._wake = threading.Event()  # flush()/close() ask an unhealthy writer to try now
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        # Writer-thread state, refreshed from the DB in every write transaction.
        self._head_seq = 0
        self._head_digest = GENESIS
        self._cp_seq = 0
        self._clock = clock  # for checkpoint_seconds; injectable so tests need not wait
        self._cp_mono = clock()
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Entries appended but not yet committed."""
        return self._backlog

    @property
    def unhealthy(self) -> str | None:
        """Why the writer cannot write (its retries ran out), or None while it can."""
        return self._unhealthy

    def refusing(self) -> AuditUnavailable | None:
        """Why work that must be audited should be refused now, or None: the backlog is at
        `max_pending`, or the writer cannot write."""
        if self._unhealthy is not None:
            return AuditUnavailable(f"the audit log cannot be written ({self._unhealthy}); "
                                    "requests that must be audited are refused until it can",
                                    retry_after=30)
        if self._backlog >= self._max_pending:
            return AuditUnavailable(f"the audit log has {self._backlog} records waiting to be "
                                    f"written (limit {self._max_pending}); requests that must "
                                    "be audited are refused until it catches up",
                                    retry_after=5)
        return None

    def append(self, entry: AuditEntry) -> None:
        """Queue `entry`; O(1), never touches the DB. Durable after the next `flush()`.

        Callers gate audited work on `refusing()`; the room between `max_pending` and twice
        that is for requests admitted before the limit was reached. Past it the entry is
        refused with `AuditUnavailable` and logged at ERROR (never dropped silently).
        """
        if self._closed:
            raise AuditClosedError("audit log is closed")
        with self._backlog_lock:
            if self._backlog >= 2 * self._max_pending:
                full = True
            else:
                full = False
                self._backlog += 1
        if full:
            log.error("audit: record refused, %d waiting: %s %s %s %s %s", self._backlog,
                      entry.subject, entry.action, entry.resource, entry.decision,
                      entry.outcome)
            raise AuditUnavailable(f"the audit log has {self._backlog} records waiting to be "
                                   "written; this record was refused", retry_after=5)
        self._queue.put((time.time_ns(), entry))

    def flush(self, timeout: float | None = None) -> None:
        """Block until every entry appended before this call is committed."""
        token = _Flush()
        if self._thread.is_alive():
            self._queue.put(token)
            self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        # Wait in slices: a writer that has stopped (after close) never answers the token,
        # but by then it wrote everything it was going to, or recorded why not.
        while not token.done.wait(0.5 if self._thread.is_alive() else 0):
            if not self._thread.is_alive():
                if self._failed:
                    raise AuditError(self._failed)
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise AuditError(f"audit records not durable after {timeout}s")
        if token.error:
            raise AuditError(token.error)

    def close(self, timeout: float | None = 30) -> None:
        """Write what is queued (and a checkpoint of the head), then stop. Safe to repeat."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
                self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not stop within %ss; %d entries queued",
                      timeout, self.pending)

    # The writer thread.

    def _run(self) -> None:
        try:
            self._load_state()
        except Exception:
            log.exception("audit: cannot read the chain head; will retry on the first write")
        pending: list[tuple[int, AuditEntry]] = []
        waiters: list[_Flush] = []
        stopping = stop_seen = False
        failures = 0
        try:
            while True:
                timeout = None if pending or waiters else self._idle_timeout()
                for item in self._take(block=not (pending or waiters), timeout=timeout):
                    if isinstance(item, _Stop):
                        stopping = True
                    elif isinstance(item, _Flush):
                        waiters.append(item)
                    else:
                        pending.append(item)
                if stopping:
                    # Appends that raced with close() still get written.
                    for item in self._take(block=False, timeout=None, limit=None):
                        if isinstance(item, _Flush):
                            waiters.append(item)
                        elif not isinstance(item, _Stop):
                            pending.append(item)
                if stopping and not stop_seen:
                    stop_seen, failures = True, 0  # a full round of tries before giving up
                self._wake.clear()  # a flush()/close() from here on wakes the next wait
                try:
                    self._write(pending, final=stopping)
                except Exception as exc:
                    failures += 1
                    if failures == 1 or failures == self._max_retries:
                        log.exception("audit: writing %d record(s) failed (try %d)",
                                      len(pending), failures)
                    if failures < self._max_retries:
                        # Backoff, not synchronisation: 0.1, 0.2, 0.4 ... seconds.
                        time.sleep(min(5.0, 0.05 * 2**failures))
                        continue
                    if stopping:
                        lost = len(pending) + self._queue.qsize()
                        self._failed = f"{lost} audit record(s) not written: {exc}"
                        log.error("audit: %s", self._failed)
                        break
                    # Retries ran out: report unhealthy (audited work is refused), keep
                    # every record queued, and try again only now and then or when
                    # flush()/close() asks (a full disk must not spin the writer).
                    if self._unhealthy is None:
                        log.error("audit: the log cannot be written after %d tries; "
                                  "audited requests are refused, %d record(s) kept queued: "
                                  "%s", failures, self._backlog, exc)
                    self._unhealthy = f"{type(exc).__name__}: {exc}"
                    for w in waiters:
                        w.error = f"audit records not written: {self._unhealthy}"
                        w.done.set()
                    waiters.clear()
                    self._wake.wait(self._retry_seconds)
                    failures = self._max_retries - 1  # one try per wake-up
                    continue
                failures = 0
                if self._unhealthy is not None:
                    log.warning("audit: the log can be written again (%d record(s) written)",
                                len(pending))
                    self._unhealthy = None
                with self._backlog_lock:
                    self._backlog -= len(pending)
                pending.clear()
                for w in waiters:
                    w.done.set()
                waiters.clear()
                if stopping:
                    break
        except BaseException as exc:
            self._failed = f"audit writer crashed: {exc!r}"
            log.exception("audit writer crashed")
            raise
        finally:
            for w in waiters:
                w.error = self._failed or "audit writer stopped"
                w.done.set()
            self._closed = True

    def _idle_timeout(self) -> float | None:
        if self._head_seq <= self._cp_seq:
            return None  # nothing unsigned: sleep until something is appended
        return max(0.0, self._cp_mono + self._seconds - self._clock())

    def _take(
        self, *, block: bool, timeout: float | None, limit: int | None = -1
    ) -> list[_QueueItem]:
        cap = self._max_batch if limit == -1 else limit
        items: list[_QueueItem] = []
        try:
            items.append(self._queue.get(block=block, timeout=timeout if block else None))
        except queue.Empty:
            return items
        while cap is None or len(items) < cap:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _load_state(self) -> None:
        with _snapshot(self._db) as cur:
            self._head_seq, self._head_digest = _head(cur)
            self._cp_seq = _last_checkpoint_seq(cur)
        if self._head_file is not None:
            try:
                heads = read_heads(self._head_file)
            except (OSError, AuditError) as exc:
                log.error("audit: cannot read the recorded head: %s", exc)
                return
            if heads and heads[-1].seq > self._head_seq:
                log.error("audit: the log ends at seq %d but %s records a signed head at "
                          "seq %d: records were deleted (audit verify names them)",
                          self._head_seq, self._head_file, heads[-1].seq)

    def _write(self, pending: list[tuple[int, AuditEntry]], *, final: bool) -> None:
        now = self._clock()
        time_due = now - self._cp_mono >= self._seconds
        if not pending and not (
            self._head_seq > self._cp_seq and (time_due or (final and self._on_close))
        ):
            return
        # Serialise and hash before taking the write lock, chained to the head we know;
        # the transaction only re-chains if someone else moved the head meanwhile.
        prepared = [_prepare(ns, entry) for ns, entry in pending]
        rows = _chain(prepared, self._head_seq, self._head_digest)
        cps: list[tuple[Any, ...]] = []
        with self._db.write_connection() as conn:
            cur: Any = conn.connection.cursor()
            try:
                head = _head(cur)
                cp_seq = _last_checkpoint_seq(cur)
            finally:
                cur.close()
            if head != (self._head_seq, self._head_digest):
                rows = _chain(prepared, *head)
            seq, digest = head
            for row in rows:
                seq, digest = row[0], row[-1]
                if seq - cp_seq >= self._every:
                    cps.append(self._sign(seq, digest))
                    cp_seq = seq
            if seq > cp_seq and (time_due or (final and self._on_close)):
                cps.append(self._sign(seq, digest))
                cp_seq = seq
            _executemany(conn, _INSERT_RECORDS, rows)
            _executemany(conn, _INSERT_CHECKPOINTS, cps)
        self._head_seq, self._head_digest, self._cp_seq = seq, digest, cp_seq
        if cps or time_due:
            self._cp_mono = now
        if cps:
            self._record_heads([Head(cp[0], cp[1], cp[2]) for cp in cps])

    def _record_heads(self, heads: list[Head]) -> None:
        """The signed heads, outside the database: the journal and the head file."""
        for head in heads:
            log.info("audit: signed head seq %d digest %s", head.seq, head.digest)
        if self._head_file is None:
            return
        try:
            record_heads(self._head_file, heads)
        except (OSError, AuditError) as exc:
            # The records are committed; only the out-of-database copy of the head is
            # missing, and the journal line above still has it.
            log.error("audit: cannot record the signed head in %s: %s", self._head_file, exc)

    def _sign(self, seq: int, digest: str) -> tuple[Any, ...]:
        sig = b64encode(self._key.sign(checkpoint_message(seq, digest))).decode("ascii")
        return (seq, digest, format_time(datetime.now(UTC)), self._key.key_id, sig)


_Prepared = tuple[dict[str, Any], str]


def _prepare(ns: int, entry: AuditEntry) -> _Prepared:
    """The record's fields but seq, and its details as stored (canonical JSON text)."""
    try:
        details_text = _details_json(entry.details)
        fields = {
            "time": _format_ns(ns),
            "subject": _safe_str(entry.subject),
            "uid": _safe_int(entry.uid),
            "pid": _safe_int(entry.pid),
            "action": _safe_str(entry.action),
            "resource": _safe_str(entry.resource),
            "decision": _safe_str(entry.decision),
            "outcome": _safe_str(entry.outcome),
            "details": json.loads(details_text),
        }
    except Exception:
        # One odd entry must not stall the log: keep what we can say about it.
        log.exception("audit: an entry could not be serialised; storing a placeholder")
        details_text = '{"_invalid":"entry could not be serialised"}'
        fields = {"time": _format_ns(ns), "subject": "?", "uid": None, "pid": None,
                  "action": "?", "resource": "?", "decision": "deny", "outcome": "error",
                  "details": json.loads(details_text)}
    return fields, details_text


def _chain(prepared: list[_Prepared], seq: int, prev: str) -> list[tuple[Any, ...]]:
    """Rows to insert, numbered from seq + 1 and chained from digest `prev`."""
    rows: list[tuple[Any, ...]] = []
    for fields, details_text in prepared:
        seq += 1
        prev = record_digest(prev, {"seq": seq, **fields})
        rows.append((
            seq, fields["time"], fields["subject"], fields["uid"], fields["pid"],
            fields["action"], fields["resource"], fields["decision"], fields["outcome"],
            details_text, prev,
        ))
    return rows


def _executemany(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        conn.exec_driver_sql(sql, rows)


# --- reading ------------------------------------------------------------------------------


@contextmanager
def _snapshot(db: Database) -> Iterator[Any]:
    """A DB-API cursor in the database's deferred read transaction: a consistent snapshot
    that takes no lock (raw rows: verification streams millions of them)."""
    with db.read_connection() as conn:
        cur = conn.connection.cursor()
        try:
            yield cur
        finally:
            cur.close()


def _head(cur: Any) -> tuple[int, str]:
    """(seq, digest) of the chain head: the last record, or the last checkpoint if pruned."""
    cur.execute(f"SELECT seq, digest FROM {_RECORD_TABLE} ORDER BY seq DESC LIMIT 1")  # noqa: S608
    rec = cur.fetchone()
    cur.execute(
        f"SELECT seq, digest FROM {_CHECKPOINT_TABLE} ORDER BY seq DESC, id DESC LIMIT 1"  # noqa: S608
    )
    cp = cur.fetchone()
    if cp is not None and (rec is None or cp[0] > rec[0]):
        return int(cp[0]), str(cp[1])
    if rec is not None:
        return int(rec[0]), str(rec[1])
    return 0, GENESIS


def _last_checkpoint_seq(cur: Any) -> int:
    cur.execute(f"SELECT MAX(seq) FROM {_CHECKPOINT_TABLE}")  # noqa: S608
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _to_record(row: Sequence[Any]) -> Record:
    seq, when, subject, uid, pid, action, resource, decision, outcome, details, digest = row
    if isinstance(details, str):
        try:
            details = json.loads(details)
        except ValueError:
            details = {"_unparseable": details}
    return Record(
        seq=seq, time=when, subject=subject, uid=uid, pid=pid, action=action,
        resource=resource, decision=decision, outcome=outcome, details=details, digest=digest,
    )


def _to_checkpoint(row: Sequence[Any]) -> Checkpoint:
    seq, digest, when, key_id, signature = row
    return Checkpoint(seq=seq, digest=digest, time=when, key_id=key_id, signature=signature)


def _iter_rows(cur: Any) -> Iterator[Sequence[Any]]:
    while rows := cur.fetchmany(_FETCH):
        yield from rows


def tail(db: Database, n: int = 20) -> list[Record]:
    """The last `n` records, oldest first."""
    with _snapshot(db) as cur:
        cur.execute(f"{_SELECT_RECORDS} ORDER BY seq DESC LIMIT ?", (max(0, n),))
        rows = cur.fetchall()
    return [_to_record(r) for r in reversed(rows)]


def get_record(db: Database, seq: int) -> Record | None:
    with _snapshot(db) as cur:
        cur.execute(f"{_SELECT_RECORDS} WHERE seq = ?", (seq,))
        row = cur.fetchone()
    return _to_record(row) if row else None


def query(
    db: Database,
    since: datetime | None = None,
    until: datetime | None = None,
    subject: str | None = None,
    action: str | None = None,
    decision: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records matching every given filter, in seq order; `until` is exclusive."""
    where: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("time >= ?", format_time(since) if since else None),
        ("time < ?", format_time(until) if until else None),
        ("subject = ?", subject),
        ("action = ?", action),
        ("decision = ?", decision),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = _SELECT_RECORDS + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(max(0, limit))
    with _snapshot(db) as cur:
        cur.execute(sql, args)
        return [_to_record(r) for r in _iter_rows(cur)]


def checkpoints(
    db: Database, min_seq: int | None = None, max_seq: int | None = None
) -> list[Checkpoint]:
    """Stored checkpoints in seq order, optionally within [min_seq, max_seq]."""
    with _snapshot(db) as cur:
        return _read_checkpoints(cur, min_seq, max_seq)


def _read_checkpoints(cur: Any, min_seq: int | None, max_seq: int | None) -> list[Checkpoint]:
    lo = -1 if min_seq is None else min_seq
    hi = 2**63 - 1 if max_seq is None else max_seq
    cur.execute(f"{_SELECT_CHECKPOINTS} WHERE seq BETWEEN ? AND ? ORDER BY seq, id", (lo, hi))
    return [_to_checkpoint(r) for r in cur.fetchall()]
