"""`edge-agent audit ...`: tail, show, export, verify and prune the tamper-evident audit log.

`verify` exits 0 when the chain is intact and 1 with one line
"audit chain broken at seq N: reason" when it is not. Exports are JSONL a third party can
verify with only the device's public key (`audit public-key`); see docs/audit.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.cli.common import (
    AgentGroup,
    Context,
    database,
    emit_json,
    fail,
    json_option,
    print_rows,
)
from agent.cli.guard import guarded
from agent.security import audit as auditlog
from agent.security import audit_verify
from agent.security.keys import key_id_of, load_device_public_key, load_public_key
from agent.terminal import printable
from localdb import Database

pass_ctx = click.make_pass_decorator(Context)
F = TypeVar("F", bound=Callable[..., Any])

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive = UTC) or a duration back from now: 90s, 15m, 24h, 7d, 2w."""
    match = _DURATION.match(value)
    if match:
        ago = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
        return (now or datetime.now(UTC)) - ago
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO 8601 time nor a duration like 24h or 7d"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _when_option(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> datetime | None:
    return None if value is None else parse_when(value)


def _public_key(ctx: Context, path: Path | None) -> Ed25519PublicKey:
    if path is not None:
        return load_public_key(path.read_bytes())
    return load_device_public_key(ctx.settings.home)


def _record_line(r: auditlog.Record) -> str:
    who = r.subject if r.pid is None else f"{r.subject} pid {r.pid}"
    return (f"{r.seq:>8} {r.time} {r.decision:<5} {r.outcome:<6} {r.action:<20} "
            f"{r.resource} by {who}")


@click.group(cls=AgentGroup)
def audit() -> None:
    """Inspect, export, verify and prune the tamper-evident audit log."""


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many records.")
@json_option
@pass_ctx
@guarded("audit:read")
def tail_(ctx: Context, count: int, as_json: bool) -> None:
    """Show the most recent records, oldest first."""
    with database(ctx) as db:
        rows = auditlog.tail(db, count)
    print_rows([r.to_dict() for r in rows], as_json, rows, _record_line, empty="no audit records")


@audit.command("show")
@click.argument("seq", type=int)
@json_option
@pass_ctx
@guarded("audit:read")
def show(ctx: Context, seq: int, as_json: bool) -> None:
    """Show one record in full, and the checkpoint that signs it (if any yet)."""
    with database(ctx) as db:
        rec = auditlog.get_record(db, seq)
        cps = auditlog.checkpoints(db, min_seq=seq) if rec else []
    if rec is None:
        fail(f"no audit record with seq {seq} (pruned, or not written yet)")
    signed_by = cps[0] if cps else None
    if as_json:
        emit_json({**rec.to_dict(), "checkpoint": signed_by.to_dict() if signed_by else None})
        return
    for name, value in rec.to_dict().items():
        shown = json.dumps(value, sort_keys=True) if name == "details" else value
        click.echo(f"{name + ':':<10} {printable(str(shown))}")
    if signed_by:
        click.echo(f"{'signed:':<10} by checkpoint at seq {signed_by.seq} "
                   f"(key {signed_by.key_id}, {signed_by.time})")
    else:
        click.echo(f"{'signed:':<10} not yet (no checkpoint at or after this seq)")


@audit.command("export")
@click.option("--since", metavar="ISO_OR_DURATION", callback=_when_option, default=None,
              help="First time included: ISO 8601 or a duration back from now (24h, 7d).")
@click.option("--until", metavar="ISO_OR_DURATION", callback=_when_option, default=None,
              help="End (exclusive); same forms.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json"]), default="jsonl",
              show_default=True, help="JSONL: one object per line; JSON: one document.")
@pass_ctx
@guarded("audit:read")
def export(ctx: Context, since: datetime | None, until: datetime | None, fmt: str) -> None:
    """Write records, their digests and checkpoints to stdout, verifiable by a third party."""
    with database(ctx) as db:
        if fmt == "jsonl":
            for obj in audit_verify.export(db, since, until):
                click.echo(json.dumps(obj, ensure_ascii=False))
            return
        objs = list(audit_verify.export(db, since, until))
    doc: dict[str, Any] = {"header": objs[0], "anchor": objs[1], "checkpoints": [],
                           "records": []}
    for obj in objs[2:]:
        doc["checkpoints" if obj["type"] == "checkpoint" else "records"].append(obj)
    click.echo(json.dumps(doc, ensure_ascii=False, indent=1))


def _read_export(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "records" in doc:
        return [doc["header"], doc["anchor"], *doc["checkpoints"], *doc["records"]]
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise auditlog.AuditError(f"{path} is not an audit export (JSONL or JSON)") from exc


@audit.command("verify")
@click.option("--public-key", "public_key", type=click.Path(path_type=Path, dir_okay=False,
              exists=True), default=None,
              help="Verify with this public key (PEM or 32 raw bytes) instead of the device's.")
@click.option("--export", "export_file", type=click.Path(path_type=Path, dir_okay=False,
              exists=True), default=None,
              help="Verify this export file instead of the registry database.")
@json_option
@pass_ctx
@guarded("audit:read")
def verify(ctx: Context, public_key: Path | None, export_file: Path | None, as_json: bool) -> None:
    """Recompute the hash chain and check checkpoint signatures; exit 1 if broken."""
    pub = _public_key(ctx, public_key)
    if export_file is not None:
        result = audit_verify.verify_export(_read_export(export_file), pub)
    else:
        with database(ctx) as db:
            result = audit_verify.verify(db, pub, head_file=ctx.settings.state.audit_head)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.line())
    if not result.ok:
        click.get_current_context().exit(1)


@audit.command("prune")
@click.option("--before", "before", type=click.IntRange(min=0), required=True,
              help="Delete records up to the latest checkpoint at or below this seq.")
@pass_ctx
@guarded("audit:manage")
def prune(ctx: Context, before: int) -> None:
    """Delete old records, never past a signed checkpoint; refuses if the chain is broken."""
    pub = _public_key(ctx, None)
    with database(ctx) as db:
        result = audit_verify.verify(db, pub, head_file=ctx.settings.state.audit_head)
        if not result.ok:
            fail(f"refusing to prune: {result.line()}")
        deleted = audit_verify.prune(db, before, public_key=pub,
                                     shipped_through=_shipped_through(ctx, db))
        first = auditlog.query(db, limit=1)
    if deleted == 0:
        click.echo(f"nothing to prune: no signed checkpoint at or below seq {before} "
                   "beyond what is already pruned")
        return
    start = f"records now start at seq {first[0].seq}" if first else "no records left"
    click.echo(f"pruned {deleted} record(s); {start}")


def _shipped_through(ctx: Context, db: Database) -> int | None:
    """What the fleet controller acknowledged, on an enrolled device (None: not enrolled)."""
    from agent.sync import enroll
    from agent.sync.outbox import Outbox

    cursor = Outbox(db, quotas={}, alarms={}).cursor("audit")
    if cursor or enroll.status(ctx.settings.home).state != "not-enrolled":
        return cursor
    return None


@audit.command("public-key")
@pass_ctx
def public_key_(ctx: Context) -> None:
    """Print the device's public key (PEM) that verifies checkpoints, and its key id."""
    pub = load_device_public_key(ctx.settings.home)
    click.echo(f"key_id {key_id_of(pub)}", err=True)
    pem = pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    click.echo(pem.decode("ascii"), nl=False)
