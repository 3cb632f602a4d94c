"""Audit log: chained records, signed checkpoints, tamper detection on the real DB file, CLI."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import threading
import time
from base64 import b64encode
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.cli.audit import audit as audit_group
from agent.cli.audit import parse_when
from agent.security import audit as A
from agent.security import audit_verify as V
from agent.security.keys import (
    DeviceKey,
    DeviceKeyError,
    load_device_public_key,
    load_or_create_device_key,
)
from agent.security.keys import verify as verify_sig
from localdb import Database, open_database


def entry(i: int, **details: object) -> A.AuditEntry:
    return A.AuditEntry(
        subject=f"uid:{1000 + i % 3}(user{i % 3})",
        action="inference:invoke" if i % 2 else "models:write",
        resource="model:smollm2-135m",
        decision="deny" if i % 5 == 0 else "allow",
        outcome=200 if i % 5 else 403,
        uid=1000 + i % 3,
        pid=4000 + i,
        details={"model": "smollm2-135m", "prompt_tokens": i, "completion_tokens": 2 * i,
                 "latency_ms": 1.5 * i, **details},
    )


def db_path(home: Path) -> Path:
    return home / "registry.db"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def db(home: Path) -> Iterator[Database]:
    database = open_database(db_path(home))
    yield database
    database.close()


@pytest.fixture
def key(home: Path) -> DeviceKey:
    return load_or_create_device_key(home)


def write_records(home: Path, n: int, start: int = 1, **kwargs: object) -> DeviceKey:
    """Append n records through a fresh AuditLog and close everything (file left on disk)."""
    key = load_or_create_device_key(home)
    database = open_database(db_path(home))
    try:
        with A.AuditLog(database, key, **kwargs) as log:  # type: ignore[arg-type]
            for i in range(start, start + n):
                log.append(entry(i))
    finally:
        database.close()
    return key


def verify_file(home: Path) -> A.VerifyResult:
    database = open_database(db_path(home))
    try:
        return V.verify(database, load_device_public_key(home))
    finally:
        database.close()


def tamper(home: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(db_path(home)) as conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def run_cli(home: Path, *args: str) -> Result:
    from agent.cli import Context, main

    env = {"EDGE_AGENT_HOME": str(home), "EDGE_AGENT_CONFIG": str(home / "none.toml")}
    (home / "none.toml").write_text("")
    runner = CliRunner()
    if "audit" in main.commands:
        return runner.invoke(main, ["audit", *args], env=env)
    return runner.invoke(audit_group, list(args), obj=Context(None, False), env=env)


def raw_rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path(home)) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


# --- writing and verifying --------------------------------------------------------------


def test_control_characters_in_stored_text_are_escaped_on_output(home: Path, db: Database,
                                                                  key: DeviceKey) -> None:
    # [hardening] finding 4: a newline and ESC[8m in a stored value printed a forged "allow
    # ... by uid:0(root)" line and hid the real subject. Whatever got stored (an older
    # record, a value from elsewhere) is printed escaped.
    forged = "model:x\n       9 2026-01-01 allow ok models:write model:y by uid:0(root)\x1b[8m"
    with A.AuditLog(db, key) as log:
        log.append(A.AuditEntry(subject="uid:1000(mallory)", action="models:load",
                                resource=forged, decision="deny", outcome=403, uid=1000,
                                pid=None, details={"note": "\u202eevil"}))
        log.flush()
    for args in (("tail",), ("show", "1")):
        out = run_cli(home, *args)
        assert out.exit_code == 0, out.output
        assert "\x1b" not in out.stdout and "\u202e" not in out.stdout
        assert "model:x\\x0a" in out.stdout and "mallory" in out.stdout
        assert not any(line.lstrip().startswith("9 2026") for line in out.stdout.splitlines())


def test_append_flush_verify_ok_via_api_and_cli(home: Path, db: Database, key: DeviceKey) -> None:
    with A.AuditLog(db, key) as log:
        for i in range(1, 501):
            log.append(entry(i))
        log.flush()
        seqs = [r[0] for r in raw_rows(home, "SELECT seq FROM audit_records ORDER BY seq")]
        assert seqs == list(range(1, 501))
        result = V.verify(db, key.public_key_pem())
        assert result.ok and result.records == 500 and result.first_bad_seq is None
    cli = run_cli(home, "verify")
    assert cli.exit_code == 0, cli.output
    assert cli.stdout.startswith("audit chain ok: 500 record(s)")
    as_json = run_cli(home, "verify", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["ok"] is True


def test_record_format_time_and_digest_formula(home: Path, db: Database, key: DeviceKey) -> None:
    with A.AuditLog(db, key) as log:
        log.append(entry(1))
        log.append(entry(2))
    first, second = A.tail(db, 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first.time)
    assert first.outcome == "200" and first.decision == "allow"
    stored_time = raw_rows(home, "SELECT time FROM audit_records WHERE seq = 1")[0][0]
    assert stored_time == first.time
    # The documented formula, computed independently of the module.
    import hashlib

    canon = json.dumps(first.content(), sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False)
    assert first.digest == hashlib.sha256(("0" * 64 + canon).encode()).hexdigest()
    assert second.digest == A.record_digest(first.digest, second.content())


@pytest.mark.parametrize(
    ("name", "statements", "bad_seq"),
    [
        ("edit a field of record 5",
         [("UPDATE audit_records SET decision = 'allow', outcome = '200' WHERE seq = 5", ())],
         5),
        ("edit details of record 5",
         [("UPDATE audit_records SET details = '{\"model\":\"other\"}' WHERE seq = 5", ())], 5),
        ("delete record 7", [("DELETE FROM audit_records WHERE seq = 7", ())], 7),
        ("swap contents of records 3 and 4",
         [("UPDATE audit_records SET seq = -3 WHERE seq = 3", ()),
          ("UPDATE audit_records SET seq = 3 WHERE seq = 4", ()),
          ("UPDATE audit_records SET seq = 4 WHERE seq = -3", ())],
         3),
    ],
)
def test_tampering_is_named_by_seq(
    home: Path, name: str, statements: list[tuple[str, tuple[object, ...]]], bad_seq: int
) -> None:
    write_records(home, 20)
    assert verify_file(home).ok
    tamper(home, *statements)
    result = verify_file(home)
    assert not result.ok, name
    assert result.first_bad_seq == bad_seq, result
    cli = run_cli(home, "verify")
    assert cli.exit_code == 1
    lines = cli.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"audit chain broken at seq {bad_seq}: ")


def _forged_row(seq: int, prev: str, digest: str | None = None) -> tuple[object, ...]:
    content = {"seq": seq, "time": A.format_time(datetime.now(UTC)), "subject": "uid:0(root)",
               "uid": 0, "pid": 1, "action": "models:write", "resource": "model:x",
               "decision": "allow", "outcome": "ok", "details": {}}
    values = list(content.values())[:9]  # seq .. outcome; details stored as text below
    return (*values, "{}", digest or A.record_digest(prev, content))


INSERT = (
    "INSERT INTO audit_records (seq, time, subject, uid, pid, action, resource, decision, "
    "outcome, details, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _insert(row: tuple[object, ...]) -> tuple[str, tuple[object, ...]]:
    return INSERT, row


def test_inserted_row_in_the_middle_is_named(home: Path) -> None:
    write_records(home, 20)
    tamper(
        home,
        ("UPDATE audit_records SET seq = -(seq + 1) WHERE seq >= 6", ()),
        ("UPDATE audit_records SET seq = -seq WHERE seq < 0", ()),
        _insert(_forged_row(6, A.GENESIS)),  # freshly computed, but not chained
    )
    assert raw_rows(home, "SELECT COUNT(*), MAX(seq) FROM audit_records")[0] == (21, 21)
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert run_cli(home, "verify").exit_code == 1


def test_forged_rows_appended_at_the_end_are_named(home: Path) -> None:
    write_records(home, 20, checkpoint_on_close=False)
    head = raw_rows(home, "SELECT digest FROM audit_records WHERE seq = 20")[0][0]
    # A correct-looking digest (64 hex chars) that is not the chain's.
    tamper(home, _insert(_forged_row(21, str(head), digest="ab" * 32)))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 21)
    # A duplicated chain link: a copy of the last record with the next seq.
    tamper(home, ("DELETE FROM audit_records WHERE seq = 21", ()),
           ("INSERT INTO audit_records SELECT 21, time, subject, uid, pid, action, resource, "
            "decision, outcome, details, digest FROM audit_records WHERE seq = 20", ()))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 21)


def test_deleting_the_first_records_without_a_checkpoint_is_named(home: Path) -> None:
    write_records(home, 20)
    tamper(home, ("DELETE FROM audit_records WHERE seq <= 3", ()))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "missing" in result.reason


def test_truncating_the_tail_past_a_checkpoint_is_named(home: Path) -> None:
    write_records(home, 20)  # the close checkpoint signs seq 20
    tamper(home, ("DELETE FROM audit_records WHERE seq >= 18", ()))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 18)
    assert "truncated" in result.reason


def test_untouched_log_verifies(home: Path) -> None:
    write_records(home, 50, checkpoint_every=7)
    result = verify_file(home)
    assert result.ok and result.records == 50 and result.checkpoints == 8
    assert result.signed_through == 50


# --- [hardening] finding 5: blind spots of verify ------------------------------------------


def head_file(home: Path) -> Path:
    return home / "audit-head"


def verify_with_head(home: Path) -> A.VerifyResult:
    database = open_database(db_path(home))
    try:
        return V.verify(database, load_device_public_key(home), head_file=head_file(home))
    finally:
        database.close()


def test_an_emptied_log_fails_against_the_recorded_head(home: Path) -> None:
    # Deleting every record and every checkpoint used to verify "ok": nothing was left to
    # contradict it. The head recorded outside the database now does.
    write_records(home, 25, checkpoint_every=10, head_file=head_file(home))
    assert verify_with_head(home).ok
    tamper(home, ("DELETE FROM audit_records", ()), ("DELETE FROM audit_checkpoints", ()))
    assert verify_file(home).ok  # the database alone cannot tell
    result = verify_with_head(home)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert result.reason.startswith("log emptied") and "seq 25" in result.reason
    cli = run_cli(home, "verify")
    assert cli.exit_code == 1
    assert cli.stdout.strip().startswith("audit chain broken at seq 1: log emptied")


def test_truncating_the_tail_with_its_checkpoints_fails_against_the_recorded_head(
    home: Path,
) -> None:
    write_records(home, 35, checkpoint_every=10, head_file=head_file(home))
    tamper(home, ("DELETE FROM audit_records WHERE seq > 22", ()),
           ("DELETE FROM audit_checkpoints WHERE seq > 22", ()))
    assert verify_file(home).ok  # what remains is a consistent, signed chain
    result = verify_with_head(home)
    assert (result.ok, result.first_bad_seq) == (False, 23)
    assert "truncated: it ends at seq 22" in result.reason and "seq 35" in result.reason
    assert run_cli(home, "verify").exit_code == 1
    assert run_cli(home, "prune", "--before", "20").exit_code == 1  # refuses a broken chain


def test_a_log_restored_from_an_older_copy_fails_against_the_recorded_head(home: Path) -> None:
    def copy(src: Path, dst: Path) -> None:
        with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
            a.backup(b)
        a.close()
        b.close()

    write_records(home, 20, checkpoint_every=10, head_file=head_file(home))
    copy(db_path(home), home / "old.db")
    write_records(home, 15, start=21, checkpoint_every=10, head_file=head_file(home))
    copy(home / "old.db", db_path(home))
    assert raw_rows(home, "SELECT MAX(seq) FROM audit_records") == [(20,)]
    # The old copy grows past the recorded heads again, with other records.
    write_records(home, 20, start=100, checkpoint_every=10, head_file=head_file(home))
    assert verify_file(home).ok
    result = verify_with_head(home)
    assert (result.ok, result.first_bad_seq) == (False, 30)
    assert "record 30 is not the one signed" in result.reason


def test_heads_are_recorded_outside_the_database_and_in_the_log(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="agent.security.audit")
    write_records(home, 35, checkpoint_every=10, head_file=head_file(home))
    lines = head_file(home).read_text().splitlines()
    cps = raw_rows(home, "SELECT seq, digest, time FROM audit_checkpoints ORDER BY seq")
    assert lines == [f"{s} {d} {t}" for s, d, t in cps] and len(lines) == 4
    assert stat.S_IMODE(head_file(home).stat().st_mode) == 0o640
    logged = [r.getMessage() for r in caplog.records if "signed head" in r.getMessage()]
    assert logged == [f"audit: signed head seq {s} digest {d}" for s, d, _t in cps]
    assert [p.name for p in home.iterdir() if "audit-head" in p.name] == ["audit-head"]
    # Pruning keeps the checkpoints the heads point at: still ok.
    database = open_database(db_path(home))
    try:
        assert V.prune(database, 30) == 30
    finally:
        database.close()
    assert verify_with_head(home).ok
    # A restart finds the log behind its recorded head and says so at once.
    tamper(home, ("DELETE FROM audit_records WHERE seq > 32", ()),
           ("DELETE FROM audit_checkpoints WHERE seq > 32", ()))
    caplog.clear()
    write_records(home, 1, start=50, head_file=head_file(home), checkpoint_on_close=False)
    assert any("records a signed head at seq 35" in r.getMessage() for r in caplog.records)


def test_an_edited_head_file_fails_and_is_not_overwritten(home: Path) -> None:
    write_records(home, 20, checkpoint_every=10, head_file=head_file(home))
    head_file(home).write_text("5 " + "0" * 64 + " whenever\n")  # moved back by hand
    result = verify_with_head(home)
    assert not result.ok and "head" in result.reason
    edited = head_file(home).read_text()
    head_file(home).write_text(edited + "garbage\n")
    assert "not a recorded head" in verify_with_head(home).reason
    write_records(home, 10, start=21, checkpoint_every=10, head_file=head_file(home))
    assert head_file(home).read_text() == edited + "garbage\n"  # left for a person to see


def test_a_duplicate_key_in_stored_details_is_detected(home: Path) -> None:
    # `{"status":403,…,"status":200}` parses (last key wins) to what was hashed, so the
    # digest matched and verify said ok, while a reader that keeps the first key (SQLite's
    # json_extract) shows 403. The stored text must be exactly the canonical JSON.
    key = load_or_create_device_key(home)
    database = open_database(db_path(home))
    try:
        with A.AuditLog(database, key) as log:
            for i in range(1, 11):
                log.append(entry(i, status=200))
    finally:
        database.close()
    text = str(raw_rows(home, "SELECT details FROM audit_records WHERE seq = 6")[0][0])
    assert '"status":200' in text
    forged = '{"status":403,' + text[1:]
    tamper(home, ("UPDATE audit_records SET details = ? WHERE seq = 6", (forged,)))
    shown = raw_rows(home, "SELECT json_extract(details, '$.status') FROM audit_records "
                           "WHERE seq = 6")[0][0]
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 6), (shown, result)
    assert "canonical JSON" in result.reason
    cli = run_cli(home, "verify")
    assert cli.exit_code == 1 and cli.stdout.startswith("audit chain broken at seq 6: ")
    # Formatting is content too now: the same object with a space is refused as well.
    tamper(home, ("UPDATE audit_records SET details = ? WHERE seq = 6", (text,)),
           ("UPDATE audit_records SET details = ? WHERE seq = 3",
            (str(raw_rows(home, "SELECT details FROM audit_records WHERE seq = 3")[0][0])
             .replace(":", ": ", 1),)))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 3)


# --- checkpoints ------------------------------------------------------------------------


def test_checkpoints_every_n_records_and_on_close(home: Path) -> None:
    key = write_records(home, 35, checkpoint_every=10)
    rows = raw_rows(home, "SELECT seq, digest, key_id, signature FROM audit_checkpoints "
                          "ORDER BY seq")
    assert [r[0] for r in rows] == [10, 20, 30, 35]
    for seq, digest, key_id, _sig in rows:
        assert key_id == key.key_id
        rec = raw_rows(home, f"SELECT digest FROM audit_records WHERE seq = {seq}")[0][0]
        assert digest == rec
    cp = A.Checkpoint(*rows[0][:2], "", str(rows[0][2]), str(rows[0][3]))  # type: ignore[arg-type]
    assert cp.signature_ok(key.public_key)
    assert A.checkpoint_message(10, "ab") == b"10:ab"


def test_time_based_checkpoint(db: Database, key: DeviceKey) -> None:
    now = [1000.0]
    with A.AuditLog(db, key, checkpoint_every=1000, checkpoint_seconds=300,
                    checkpoint_on_close=False, clock=lambda: now[0]) as log:
        log.append(entry(1))
        log.flush()
        assert A.checkpoints(db) == []
        now[0] += 301
        log.append(entry(2))
        log.flush()
        assert [c.seq for c in A.checkpoints(db)] == [2]


def test_checkpoint_signed_by_another_key_is_detected(home: Path) -> None:
    write_records(home, 35, checkpoint_every=10)
    other = DeviceKey.generate()
    digest = raw_rows(home, "SELECT digest FROM audit_checkpoints WHERE seq = 20")[0][0]
    forged = b64encode(other.sign(A.checkpoint_message(20, str(digest)))).decode()
    tamper(home, ("UPDATE audit_checkpoints SET signature = ? WHERE seq = 20", (forged,)))
    result = verify_file(home)
    assert (result.ok, result.first_bad_seq) == (False, 20)
    assert "signature" in result.reason
    cli = run_cli(home, "verify")
    assert cli.exit_code == 1 and cli.stdout.startswith("audit chain broken at seq 20: ")


def test_checkpoint_digest_edit_is_detected(home: Path) -> None:
    write_records(home, 35, checkpoint_every=10)
    tamper(home, ("UPDATE audit_checkpoints SET digest = ? WHERE seq = 30", ("cd" * 32,)))
    assert verify_file(home).first_bad_seq == 30


def test_verify_with_the_wrong_public_key_fails(home: Path, db: Database) -> None:
    write_records(home, 15, checkpoint_every=10)
    result = V.verify(db, DeviceKey.generate().public_key_raw())
    assert (result.ok, result.first_bad_seq) == (False, 10)


# --- pruning ----------------------------------------------------------------------------


def test_prune_up_to_a_checkpoint_then_verify(home: Path) -> None:
    write_records(home, 35, checkpoint_every=10)
    database = open_database(db_path(home))
    try:
        assert V.prune(database, 25) == 20  # to the checkpoint at 20, not to 25
        assert [r[0] for r in raw_rows(home, "SELECT MIN(seq) FROM audit_records")] == [21]
        result = V.verify(database, load_device_public_key(home))
        assert result.ok and result.first_seq == 21 and result.records == 15
        assert V.prune(database, 25) == 0  # nothing more below 25
    finally:
        database.close()
    cli = run_cli(home, "prune", "--before", "30")
    assert cli.exit_code == 0, cli.output
    assert "pruned 10 record(s); records now start at seq 31" in cli.stdout
    assert run_cli(home, "verify").exit_code == 0


def test_prune_never_removes_past_the_last_checkpoint(home: Path, db: Database) -> None:
    key = write_records(home, 35, checkpoint_every=10, checkpoint_on_close=False)
    assert V.prune(db, 9) == 0  # no checkpoint at or below 9
    assert V.prune(db, 10_000, public_key=key.public_key) == 30
    seqs = [r[0] for r in raw_rows(home, "SELECT seq FROM audit_records ORDER BY seq")]
    assert seqs == list(range(31, 36))
    assert V.verify(db, key.public_key).ok


def test_prune_skips_a_checkpoint_that_does_not_match_its_record(home: Path, db: Database) -> None:
    write_records(home, 35, checkpoint_every=10)
    tamper(home, ("UPDATE audit_checkpoints SET digest = ? WHERE seq = 20", ("00" * 32,)))
    assert V.prune(db, 25) == 10  # falls back to the checkpoint at 10


def test_cli_prune_refuses_a_broken_chain(home: Path) -> None:
    write_records(home, 35, checkpoint_every=10)
    tamper(home, ("DELETE FROM audit_records WHERE seq = 33", ()))
    cli = run_cli(home, "prune", "--before", "30")
    assert cli.exit_code == 1
    assert "refusing to prune" in cli.stderr
    # nothing pruned: the 34 left by the tamper, plus the CLI's own audit record
    assert raw_rows(home, "SELECT COUNT(*) FROM audit_records")[0][0] == 35


def test_deleting_past_the_prune_checkpoint_is_named(home: Path, db: Database) -> None:
    write_records(home, 35, checkpoint_every=10)
    assert V.prune(db, 20) == 20
    tamper(home, ("DELETE FROM audit_records WHERE seq <= 22", ()))
    assert verify_file(home).first_bad_seq == 21


# --- privacy, keys ----------------------------------------------------------------------


def test_prompt_and_completion_text_are_never_stored(home: Path, db: Database,
                                                     key: DeviceKey) -> None:
    secret = "my very secret prompt"
    with A.AuditLog(db, key) as log:
        log.append(entry(1, prompt=secret, messages=[{"role": "user", "content": secret}],
                         completion_text=secret, nested={"Content": secret, "ok": 1},
                         choices=[{"text": secret}]))
    raw = raw_rows(home, "SELECT * FROM audit_records")
    assert secret not in repr(raw)
    (rec,) = A.tail(db, 1)
    assert rec.details["nested"] == {"ok": 1}
    assert rec.details["_redacted"] == ["Content", "choices", "completion_text", "messages",
                                        "prompt"]
    assert rec.details["prompt_tokens"] == 1  # counts are kept
    assert V.verify(db, key.public_key).ok


def test_odd_detail_values_are_stored_verifiably(db: Database, key: DeviceKey) -> None:
    with A.AuditLog(db, key) as log:
        log.append(entry(1, path=Path("/x"), items=(1, 2), ratio=0.1, big=2**70, uni="é✓"))
        log.append(entry(2, bad=float("nan")))
        log.append(entry(3, surrogate="\udc80"))
    first, second, third = A.tail(db, 3)
    assert first.details["path"] == "/x" and first.details["items"] == [1, 2]
    assert "_invalid" in second.details
    assert third.details["surrogate"] == "?"
    assert V.verify(db, key.public_key).ok


def test_entry_rejects_an_unknown_decision() -> None:
    with pytest.raises(ValueError, match="allow"):
        A.AuditEntry(subject="s", action="a", resource="r", decision="maybe", outcome="ok")


def test_key_file_is_created_0600_in_a_0700_dir_and_reused(home: Path) -> None:
    key = load_or_create_device_key(home)
    path = home / "keys" / "device-ed25519.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    assert load_or_create_device_key(home).key_id == key.key_id
    assert len(key.key_id) == 16 and key.key_id not in repr(path.read_bytes())
    assert load_device_public_key(home).public_bytes_raw() == key.public_key_raw()
    assert list(path.parent.glob(".*tmp")) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_group_or_world_accessible_key_file_is_refused(home: Path, mode: int) -> None:
    load_or_create_device_key(home)
    path = home / "keys" / "device-ed25519.pem"
    path.chmod(mode)
    with pytest.raises(DeviceKeyError, match="chmod 600"):
        load_or_create_device_key(home)


def test_symlinked_key_file_is_refused(home: Path, tmp_path_factory: pytest.TempPathFactory,
                                       ) -> None:
    other = tmp_path_factory.mktemp("other")
    load_or_create_device_key(other)
    (home / "keys").mkdir(mode=0o700)
    (home / "keys" / "device-ed25519.pem").symlink_to(other / "keys" / "device-ed25519.pem")
    with pytest.raises(DeviceKeyError):
        load_or_create_device_key(home)


@pytest.mark.parametrize("case", ["0777", "symlinked", "owned by another uid",
                                  "key file owned by another uid"])
def test_a_key_directory_another_account_controls_is_refused(
    home: Path, tmp_path_factory: pytest.TempPathFactory, case: str
) -> None:
    # [hardening] finding 10: a 0777 or symlinked keys/ and a key file owned by another uid
    # were accepted by a root daemon.
    import os
    import pwd

    from agent.security.keys import open_device_key

    nobody = pwd.getpwnam("nobody").pw_uid
    load_or_create_device_key(home)
    kdir = home / "keys"
    if case == "0777":
        kdir.chmod(0o777)
    elif case == "symlinked":
        other = tmp_path_factory.mktemp("other")
        load_or_create_device_key(other)
        shutil.rmtree(kdir)
        kdir.symlink_to(other / "keys")
    elif os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    elif case == "owned by another uid":
        os.chown(kdir, nobody, -1)
    else:
        os.chown(kdir / "device-ed25519.pem", nobody, -1)
    loaders: list[Any] = [load_or_create_device_key, open_device_key]
    if case != "key file owned by another uid":  # the public half is in its own file
        loaders.append(load_device_public_key)
    for load in loaders:
        with pytest.raises(DeviceKeyError) as err:
            load(home)
        assert "keys" in str(err.value)


def test_standalone_verify_accepts_pem_and_raw(key: DeviceKey) -> None:
    sig = key.sign(b"data")
    assert verify_sig(key.public_key_pem(), sig, b"data")
    assert verify_sig(key.public_key_pem().decode(), sig, b"data")
    assert verify_sig(key.public_key_raw(), sig, b"data")
    assert not verify_sig(key.public_key_raw(), sig, b"other")
    assert not verify_sig(DeviceKey.generate().public_key_pem(), sig, b"data")


# --- the writer -------------------------------------------------------------------------


def test_concurrent_appends_keep_seq_contiguous_and_chain_valid(db: Database,
                                                                key: DeviceKey) -> None:
    threads, per_thread = 8, 400
    barrier = threading.Barrier(threads)
    with A.AuditLog(db, key, checkpoint_every=250, max_batch=97) as log:

        def worker(t: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                log.append(entry(t * per_thread + i))

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        log.flush()
        records = A.query(db)
    assert [r.seq for r in records] == list(range(1, threads * per_thread + 1))
    assert len({r.pid for r in records}) == threads * per_thread
    assert V.verify(db, key.public_key).ok


def test_two_writers_on_one_db_rechain_instead_of_forking(db: Database, key: DeviceKey) -> None:
    first, second = A.AuditLog(db, key), A.AuditLog(db, key)
    try:
        for i in range(1, 301):
            (first if i % 2 else second).append(entry(i))
            if i % 50 == 0:
                first.flush()
                second.flush()
    finally:
        first.close()
        second.close()
    assert [r.seq for r in A.query(db)] == list(range(1, 301))
    assert V.verify(db, key.public_key).ok


def test_an_unserialisable_entry_becomes_a_placeholder(db: Database, key: DeviceKey,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

    bad = A.AuditEntry(subject=Bad(), action="a", resource="r", decision="allow",  # type: ignore[arg-type]
                       outcome="ok")
    with A.AuditLog(db, key) as log:
        log.append(bad)
        log.append(entry(2))
    placeholder, good = A.query(db)
    assert placeholder.subject == "?" and "_invalid" in placeholder.details
    assert good.seq == 2 and V.verify(db, key.public_key).ok


def test_append_does_not_touch_the_db(home: Path, db: Database, key: DeviceKey) -> None:
    with A.AuditLog(db, key) as log:
        blocker = sqlite3.connect(db_path(home), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        start = time.perf_counter()
        for i in range(1, 1001):
            log.append(entry(i))
        elapsed = time.perf_counter() - start
        blocker.execute("ROLLBACK")
        blocker.close()
        log.flush()
    assert elapsed < 1.0
    assert len(A.query(db)) == 1000


def test_close_twice_and_append_after_close(db: Database, key: DeviceKey) -> None:
    log = A.AuditLog(db, key)
    log.append(entry(1))
    log.close()
    log.close()
    log.flush()  # nothing pending: returns
    with pytest.raises(A.AuditClosedError):
        log.append(entry(2))
    assert [r.seq for r in A.tail(db, 5)] == [1]
    assert not any(t.name == "audit-writer" and t.is_alive() for t in threading.enumerate())


def test_reopening_continues_the_chain(home: Path) -> None:
    write_records(home, 30, checkpoint_every=1000)
    write_records(home, 12, start=31, checkpoint_every=1000)
    seqs = [r[0] for r in raw_rows(home, "SELECT seq FROM audit_records ORDER BY seq")]
    assert seqs == list(range(1, 43))
    result = verify_file(home)
    assert result.ok and result.records == 42
    assert [r[0] for r in raw_rows(home, "SELECT seq FROM audit_checkpoints")] == [30, 42]


def test_reopening_after_pruning_everything_continues_from_the_checkpoint(
    home: Path, db: Database
) -> None:
    key = write_records(home, 20, checkpoint_every=10)
    assert V.prune(db, 20) == 20
    assert V.verify(db, key.public_key).ok  # no records, checkpoints only
    write_records(home, 5, start=21)
    assert [r.seq for r in A.query(db)] == [21, 22, 23, 24, 25]
    assert V.verify(db, key.public_key).ok


# --- reading, export, CLI ---------------------------------------------------------------


def test_query_filters(db: Database, key: DeviceKey) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    with A.AuditLog(db, key) as log:
        for i in range(1, 21):
            log.append(entry(i))
    assert len(A.query(db, since=before)) == 20
    assert A.query(db, until=before) == []
    denied = A.query(db, decision="deny")
    assert [r.seq for r in denied] == [5, 10, 15, 20]
    assert {r.subject for r in A.query(db, subject="uid:1001(user1)")} == {"uid:1001(user1)"}
    assert len(A.query(db, action="models:write", limit=3)) == 3
    assert A.get_record(db, 7) is not None and A.get_record(db, 99) is None


def test_export_verifies_offline_with_only_the_public_key(home: Path) -> None:
    key = write_records(home, 45, checkpoint_every=10)
    out = run_cli(home, "export", "--since", "1h")
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [o["type"] for o in lines[:2]] == ["header", "anchor"]
    assert sum(o["type"] == "record" for o in lines) == 45
    result = V.verify_export(lines, key.public_key_pem())
    assert result.ok and result.signed_through == 45
    export_file = home / "export.jsonl"
    export_file.write_text(out.stdout)
    pub = home / "device.pub"
    pub.write_bytes(key.public_key_pem())
    cli = run_cli(home, "verify", "--export", str(export_file), "--public-key", str(pub))
    assert cli.exit_code == 0, cli.output
    # Tampered export: one record's outcome changed.
    lines[10]["outcome"] = "999"
    export_file.write_text("\n".join(json.dumps(o) for o in lines))
    cli = run_cli(home, "verify", "--export", str(export_file), "--public-key", str(pub))
    assert cli.exit_code == 1
    assert cli.stdout.startswith(f"audit chain broken at seq {lines[10]['seq']}: ")


def test_partial_export_verifies_from_its_anchor(home: Path, db: Database) -> None:
    key = write_records(home, 45, checkpoint_every=10)
    cut = A.get_record(db, 16)
    assert cut is not None
    since = datetime.fromisoformat(cut.time)
    objs = list(V.export(db, since=since))
    assert objs[1] == {"type": "anchor", "seq": 15, "digest": A.get_record(db, 15).digest}  # type: ignore[union-attr]
    assert min(o["seq"] for o in objs if o["type"] == "record") == 16
    assert V.verify_export(objs, key.public_key).ok
    # A substituted anchor is caught by the first checkpoint that covers it.
    objs[1] = {**objs[1], "digest": "ee" * 32}
    result = V.verify_export(objs, key.public_key)
    assert not result.ok and result.first_bad_seq == 16
    # JSON format round-trips through the CLI verifier too.
    doc = run_cli(home, "export", "--format", "json")
    assert doc.exit_code == 0 and len(json.loads(doc.stdout)["records"]) == 45
    (home / "export.json").write_text(doc.stdout)
    (home / "device.pub").write_bytes(key.public_key_raw())
    cli = run_cli(home, "verify", "--export", str(home / "export.json"),
                  "--public-key", str(home / "device.pub"), "--json")
    assert cli.exit_code == 0 and json.loads(cli.stdout)["signed_through"] == 45


def test_cli_tail_and_show(home: Path) -> None:
    write_records(home, 12, checkpoint_every=10)
    out = run_cli(home, "tail", "-n", "3")
    assert out.exit_code == 0, out.output
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["10", "11", "12"]
    as_json = json.loads(run_cli(home, "tail", "-n", "2", "--json").stdout)
    assert [r["seq"] for r in as_json] == [12, 13]  # 13: the first `tail`, itself audited
    show = run_cli(home, "show", "5", "--json")
    data = json.loads(show.stdout)
    assert data["seq"] == 5 and data["checkpoint"]["seq"] == 10
    assert "signed:" in run_cli(home, "show", "11").stdout
    missing = run_cli(home, "show", "99")
    assert missing.exit_code == 1 and "no audit record with seq 99" in missing.stderr


def test_cli_without_a_database_or_key_fails_cleanly(home: Path) -> None:
    out = run_cli(home, "tail")
    assert out.exit_code == 1 and "no registry database" in out.stderr
    open_database(db_path(home)).close()
    out = run_cli(home, "verify")
    assert out.exit_code == 1 and "no device key" in out.stderr


def test_parse_when() -> None:
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_when("24h", now=now) == now - timedelta(hours=24)
    assert parse_when("90s", now=now) == now - timedelta(seconds=90)
    assert parse_when("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_when("2026-01-01") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(Exception, match="duration"):
        parse_when("yesterday")


def test_open_device_key_creates_on_first_start_then_defers_parsing(tmp_path: Path) -> None:
    from agent.security.keys import DeviceKey, DeviceKeyError, LazyDeviceKey, open_device_key
    from agent.security.keys import verify as verify_sig

    first = open_device_key(tmp_path)
    assert isinstance(first, DeviceKey)
    later = open_device_key(tmp_path)
    assert isinstance(later, LazyDeviceKey)
    assert later.key_id == first.key_id
    assert verify_sig(first, later.sign(b"12:abc"), b"12:abc")
    key_file = tmp_path / "keys" / "device-ed25519.pem"
    key_file.chmod(0o644)
    with pytest.raises(DeviceKeyError, match="chmod 600"):
        open_device_key(tmp_path)  # an unsafe key still stops the start, before any parse
