"""Audit verification, pruning and export: what an auditor runs, on a live or copied DB.

`verify` walks the chain recomputing every digest and checks each checkpoint's signature
with only the device's public key; `prune` deletes up to a signed checkpoint and no
further; `export` writes JSONL that `verify_export` checks offline. docs/audit.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
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
    format_time,
    record_digest,
)
from agent.security.keys import load_public_key
from localdb import Database

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.security.audit import PublicKeyLike

log = logging.getLogger("agent.security.audit")

# --- verification -------------------------------------------------------------------------




def verify(db: Database, public_key: PublicKeyLike) -> VerifyResult:
    """Walk the whole log recomputing digests and checking checkpoints (works offline)."""
    pub = load_public_key(public_key)
    with _snapshot(db) as cur:
        cps = _read_checkpoints(cur, None, None)
        cur.execute(f"{_SELECT_RECORDS} ORDER BY seq")
        return _verify_chain((_to_record(r) for r in _iter_rows(cur)), cps, pub, anchor=None)


def _verify_chain(
    records: Iterable[Record],
    cps: Sequence[Checkpoint],
    pub: Ed25519PublicKey,
    anchor: tuple[int, str | None] | None,
) -> VerifyResult:
    """The checks of docs/audit.md. `anchor` (seq, digest) is an export's chain predecessor;
    without one, the chain starts at genesis or at a signed checkpoint (pruned prefix)."""
    issues: list[tuple[int, str]] = []
    valid: dict[int, list[Checkpoint]] = {}
    any_at: set[int] = set()
    for cp in cps:
        any_at.add(cp.seq)
        if cp.signature_ok(pub):
            valid.setdefault(cp.seq, []).append(cp)
        else:
            issues.append((cp.seq, f"checkpoint at seq {cp.seq} has an invalid signature "
                                   f"(key_id {cp.key_id})"))
    signed_through: int | None = None

    def check_cps_at(seq: int, digest: str) -> None:
        nonlocal signed_through
        for cp in valid.get(seq, ()):
            if cp.digest != digest:
                issues.append((seq, f"checkpoint at seq {seq} does not match the chain "
                                    "(record or checkpoint altered)"))
            else:
                signed_through = seq

    it = iter(records)
    first = next(it, None)
    count = 0
    first_seq = last_seq = None
    chain_issue: tuple[int, str] | None = None
    if first is None:
        if anchor is not None and anchor[1] is not None:
            check_cps_at(anchor[0], anchor[1])
        elif valid:
            signed_through = max(valid)
    else:
        first_seq = first.seq
        prev: str | None
        if anchor is not None:
            base, prev = anchor
            if base == 0 and prev != GENESIS:
                chain_issue = (1, "export anchor at seq 0 is not the genesis digest")
            elif prev is None:
                chain_issue = (first.seq, "export has no digest for the record before it")
            else:
                check_cps_at(base, prev)
        elif first.seq == 1:
            base, prev = 0, GENESIS
        else:
            base = first.seq - 1
            at_base = valid.get(base)
            if at_base:
                prev = at_base[0].digest
                check_cps_at(base, prev)
            elif base in any_at:
                # Its forged signature is already an issue at `base`; keep walking from it.
                prev = next(cp.digest for cp in cps if cp.seq == base)
            else:
                lower = max((s for s in valid if s < first.seq), default=0)
                prev = None
                chain_issue = (
                    lower + 1,
                    f"records {lower + 1}..{base} are missing (records start at seq "
                    f"{first.seq} but no signed checkpoint vouches for seq {base})",
                )
        expected = base + 1
        if chain_issue is None and prev is not None:
            for rec in _prepend(first, it):
                if rec.seq != expected:
                    if rec.seq < expected:
                        chain_issue = (rec.seq, "record out of order or duplicated")
                    elif rec.seq == expected + 1:
                        chain_issue = (expected, f"record {expected} is missing (deleted)")
                    else:
                        chain_issue = (expected, f"records {expected}..{rec.seq - 1} are "
                                                 "missing (deleted)")
                    break
                if record_digest(prev, rec.content()) != rec.digest:
                    chain_issue = (rec.seq, "record does not match its digest "
                                            "(edited, inserted or reordered)")
                    break
                check_cps_at(rec.seq, rec.digest)
                prev = rec.digest
                last_seq = rec.seq
                expected += 1
                count += 1
            if chain_issue is None:
                for seq in sorted(s for s in any_at if s >= expected):
                    chain_issue = (expected, f"records from seq {expected} are missing: a "
                                             f"checkpoint covers seq {seq} (log truncated)")
                    break
    if chain_issue is not None:
        issues.append(chain_issue)
    if issues:
        bad_seq, reason = min(issues, key=lambda i: i[0])
        return VerifyResult(False, bad_seq, reason, count, len(cps), first_seq, last_seq,
                            signed_through)
    return VerifyResult(True, None, "ok", count, len(cps), first_seq, last_seq, signed_through)


def _prepend(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


# --- pruning and export -------------------------------------------------------------------


def prune(db: Database, before_seq: int, *, public_key: PublicKeyLike | None = None) -> int:
    """Delete records up to the latest checkpoint at or below `before_seq`; how many went.

    Never past a checkpoint: the checkpoint pruned to must match its record's digest (and,
    given `public_key`, carry a valid signature), so what remains still verifies.
    """
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
    return _verify_chain(records, cps, pub, anchor=anchor)
