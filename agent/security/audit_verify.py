"""Audit verification, pruning and export: what an auditor runs, on a live or copied DB.

`verify` walks the chain recomputing every digest and checks each checkpoint's signature
with only the device's public key; `prune` deletes up to a signed checkpoint and no
further; `export` writes JSONL that `verify_export` checks offline. docs/audit.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.security.audit import (
    _CHECKPOINT_TABLE,
    _RECORD_TABLE,
    _SELECT_RECORDS,
    EXPORT_FORMAT,
    GENESIS,
    AuditError,
    Checkpoint,
    Record,
    VerifyResult,
    _head,
    _iter_rows,
    _read_checkpoints,
    _snapshot,
    _to_record,
    canonical_json,
    format_time,
)
from agent.security.audit_head import Head, read_heads
from agent.security.keys import load_public_key
from fleet.auditchain import verify_chain
from localdb import Database

if TYPE_CHECKING:

    from agent.security.audit import PublicKeyLike

log = logging.getLogger("agent.security.audit")

# --- verification -------------------------------------------------------------------------

_Issue = tuple[int, str]


def verify(
    db: Database, public_key: PublicKeyLike, *, head_file: Path | None = None
) -> VerifyResult:
    """Walk the whole log recomputing digests and checking checkpoints (works offline).

    Also: each record's stored `details` text must be exactly the canonical JSON that was
    hashed (a parser that keeps the first of two duplicate keys must not read something
    else than the verifier did); and, given `head_file`, the log must still reach every
    head recorded there, with the same digest (truncation, emptying, rollback).
    """
    pub = load_public_key(public_key)
    heads: list[Head] = []
    issues: list[_Issue] = []
    if head_file is not None:
        try:
            heads = read_heads(head_file)
        except AuditError as exc:
            issues.append((0, f"the recorded head cannot be trusted: {exc}"))
        except OSError as exc:
            log.warning("audit: cannot read %s, so truncation is not checked: %s",
                        head_file, exc.strerror)
    with _snapshot(db) as cur:
        # A byte edit can leave text that is not UTF-8, which sqlite3 refuses to return at
        # all (OperationalError); read it with U+FFFD instead, so its digest names it.
        conn = cur.connection
        text_factory = conn.text_factory
        conn.text_factory = _lenient_text
        try:
            cps = _read_checkpoints(cur, None, None)
            cur.execute(f"{_SELECT_RECORDS} ORDER BY seq")
            stored: list[_Issue] = []
            result = verify_chain(_canonical_records(_iter_rows(cur), stored), cps, pub,
                                  anchor=None)
            issues += stored
            if heads:
                issues += _head_issues(cur, heads, cps, head_file)
        finally:
            conn.text_factory = text_factory
    if not issues:
        return result
    if not result.ok:
        issues.append((result.first_bad_seq or 0, result.reason))
    bad_seq, reason = min(issues, key=lambda i: i[0])
    return dataclasses.replace(result, ok=False, first_bad_seq=bad_seq, reason=reason)


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _canonical_records(rows: Iterator[Sequence[Any]], issues: list[_Issue]) -> Iterator[Record]:
    """The records, noting the first whose stored details text is not the canonical JSON of
    what it parses to (duplicate keys, spacing, escapes: the text was edited)."""
    for row in rows:
        rec = _to_record(row)
        if not issues:
            text = row[9]
            try:
                canonical = isinstance(text, str) and canonical_json(json.loads(text)) == text
            except ValueError:
                canonical = False  # unparseable: the digest check names it too
            if not canonical:
                issues.append((rec.seq, "stored details are not the canonical JSON that was "
                                        "hashed (edited, e.g. a duplicate key)"))
        yield rec


def _head_issues(cur: Any, heads: list[Head], cps: list[Checkpoint],
                 head_file: Path | None) -> list[_Issue]:
    """Where the log no longer agrees with the heads recorded outside the database."""
    cur.execute(f"SELECT MIN(seq), MAX(seq) FROM {_RECORD_TABLE}")  # noqa: S608
    first, last = cur.fetchone()
    at_cp = {(cp.seq, cp.digest) for cp in cps}
    newest = heads[-1]
    recorded = f"{head_file} records signed heads up to seq {newest.seq} ({newest.time})"
    issues: list[_Issue] = []
    for head in heads:
        cur.execute(f"SELECT digest FROM {_RECORD_TABLE} WHERE seq = ?", (head.seq,))  # noqa: S608
        row = cur.fetchone()
        if row is not None:
            if row[0] != head.digest:
                issues.append((head.seq, f"record {head.seq} is not the one signed at "
                                         f"{head.time} as recorded in {head_file} (log "
                                         "rewritten or restored from an older copy)"))
                break
            continue
        if (head.seq, head.digest) in at_cp:
            continue  # pruned up to here: the checkpoint still vouches for it
        if first is None and not cps:
            issues.append((1, f"log emptied: no records or checkpoints, but {recorded}"))
        elif last is None or head.seq > last:
            end = last or max((cp.seq for cp in cps), default=0)
            issues.append((end + 1, f"log truncated: it ends at seq {end}, but {recorded}"))
        else:
            issues.append((head.seq, f"the checkpoint at seq {head.seq} recorded in "
                                     f"{head_file} is missing (deleted)"))
        break  # the oldest disagreement names the first bad seq
    return issues


# --- pruning and export -------------------------------------------------------------------


def prune(
    db: Database,
    before_seq: int,
    *,
    public_key: PublicKeyLike | None = None,
    shipped_through: int | None = None,
) -> int:
    """Delete records up to the latest checkpoint at or below `before_seq`; how many went.

    Never past a checkpoint: the checkpoint pruned to must match its record's digest (and,
    given `public_key`, carry a valid signature), so what remains still verifies. On an
    enrolled device `shipped_through` (what the controller acknowledged) caps it too: a
    record the fleet has not received is never deleted.
    """
    if shipped_through is not None:
        before_seq = min(before_seq, shipped_through)
    pub = load_public_key(public_key) if public_key is not None else None
    with db.write_connection() as conn:
        cur: Any = conn.connection.cursor()
        try:
            for cp in _read_checkpoints(cur, None, before_seq)[::-1]:
                if pub is not None and not cp.signature_ok(pub):
                    continue
                cur.execute(f"SELECT digest FROM {_RECORD_TABLE} WHERE seq = ?", (cp.seq,))  # noqa: S608
                row = cur.fetchone()
                if row is None:
                    cur.execute(f"SELECT MIN(seq) FROM {_RECORD_TABLE}")  # noqa: S608
                    lowest = cur.fetchone()[0]
                    if lowest is None or lowest > cp.seq:
                        return 0  # already pruned to here or beyond
                    continue  # a checkpoint over a missing record: not one to trust
                if row[0] != cp.digest:
                    continue
                cur.execute(f"DELETE FROM {_RECORD_TABLE} WHERE seq <= ?", (cp.seq,))  # noqa: S608
                deleted = int(cur.rowcount)
                log.info("audit: pruned %d record(s) up to checkpoint seq %d", deleted, cp.seq)
                return deleted
            return 0
        finally:
            cur.close()


def export(
    db: Database, since: datetime | None = None, until: datetime | None = None
) -> Iterator[dict[str, Any]]:
    """The records from the first at/after `since` to the last before `until`, contiguous,
    with what a third party needs to verify them: a header, the anchor (digest of the record
    before the first), the checkpoints in range, then the records. One object per JSONL line.
    """
    with _snapshot(db) as cur:
        lo_sql = f"SELECT MIN(seq) FROM {_RECORD_TABLE} WHERE time >= ?"  # noqa: S608
        hi_sql = f"SELECT MAX(seq) FROM {_RECORD_TABLE} WHERE time < ?"  # noqa: S608
        cur.execute(lo_sql, (format_time(since) if since else "",))
        lo = cur.fetchone()[0]
        cur.execute(hi_sql, (format_time(until) if until else "~",))
        hi = cur.fetchone()[0]
        head_seq, head_digest = _head(cur)
        if lo is None or hi is None or hi < lo:
            lo, hi = head_seq + 1, head_seq
        base = lo - 1
        anchor: str | None = GENESIS if base == 0 else None
        if base == head_seq:
            anchor = head_digest
        elif base > 0:
            cur.execute(f"SELECT digest FROM {_RECORD_TABLE} WHERE seq = ?", (base,))  # noqa: S608
            row = cur.fetchone()
            if row is None:
                cur.execute(f"SELECT digest FROM {_CHECKPOINT_TABLE} WHERE seq = ?", (base,))  # noqa: S608
                row = cur.fetchone()
            anchor = row[0] if row else None
        cps = _read_checkpoints(cur, base, hi)
        key_ids = sorted({cp.key_id for cp in cps})
        yield {
            "type": "header", "format": EXPORT_FORMAT, "first_seq": lo, "last_seq": hi,
            "exported_at": format_time(datetime.now(UTC)), "key_ids": key_ids,
        }
        yield {"type": "anchor", "seq": base, "digest": anchor}
        for cp in cps:
            yield {"type": "checkpoint", **cp.to_dict()}
        cur.execute(f"{_SELECT_RECORDS} WHERE seq BETWEEN ? AND ? ORDER BY seq", (lo, hi))
        for row in _iter_rows(cur):
            yield {"type": "record", **_to_record(row).to_dict()}


def verify_export(objects: Iterable[Mapping[str, Any]], public_key: PublicKeyLike) -> VerifyResult:
    """Verify an export (the objects `export()` yields, e.g. parsed JSONL lines) offline."""
    pub = load_public_key(public_key)
    anchor: tuple[int, str | None] | None = None
    cps: list[Checkpoint] = []
    records: list[Record] = []
    for n, obj in enumerate(objects, 1):
        kind = obj.get("type")
        try:
            if kind == "anchor":
                anchor = (int(obj["seq"]), obj.get("digest"))
            elif kind == "checkpoint":
                cps.append(Checkpoint.from_dict(obj))
            elif kind == "record":
                records.append(Record.from_dict(obj))
            elif kind == "header" and obj.get("format") != EXPORT_FORMAT:
                raise AuditError(f"unknown export format {obj.get('format')!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditError(f"export object {n} ({kind}) is malformed: {exc}") from exc
    if anchor is None:
        raise AuditError("export has no anchor line: is it complete?")
    if any(not isinstance(r.seq, int) for r in records):
        raise AuditError("export has a record without an integer seq")
    records.sort(key=lambda r: r.seq)
    return verify_chain(records, cps, pub, anchor=anchor)
