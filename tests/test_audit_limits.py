"""[hardening] finding 1: an audit flood cannot fill the disk or memory. Repeated denials
become counted summaries, the writer's backlog is bounded, a full disk makes the writer
report unhealthy (nothing lost once space is back), and below the free-disk watermark
audited work is refused with 503 while /readyz and /metrics say why."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import running
from filesystems import fill, small_fs

from agent.errors import AuditError, AuditUnavailable
from agent.security import audit as A
from agent.security import audit_verify as V
from agent.security.denials import OTHER_REASONS, DenialSummaries
from agent.security.keys import load_device_public_key, load_or_create_device_key
from localdb import open_database

MiB = 1024 * 1024


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll `check` until true (a deadline, not a sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def entry(i: int, size: int = 0) -> A.AuditEntry:
    return A.AuditEntry(subject="uid:1000(alice)", action="models:write",
                        resource=f"model:m{i}", decision="allow", outcome="ok", uid=1000,
                        pid=i, details={"pad": "x" * size, "i": i})


# --- the writer's backlog and a full disk ------------------------------------------------


def test_the_backlog_is_bounded_and_audited_work_is_refused_at_its_limit(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    key = load_or_create_device_key(tmp_path)
    try:
        with A.AuditLog(db, key, max_pending=50) as log:
            blocker = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # the writer cannot commit: the backlog grows
            for i in range(1, 50):
                log.append(entry(i))
            assert log.refusing() is None
            log.append(entry(50))
            refusal = log.refusing()
            assert isinstance(refusal, AuditUnavailable) and refusal.retry_after == 5
            assert "50 records waiting" in str(refusal)
            for i in range(51, 101):  # room for requests admitted before the limit
                log.append(entry(i))
            with pytest.raises(AuditUnavailable, match="was refused"):
                log.append(entry(101))
            assert log.pending == 100
            blocker.execute("ROLLBACK")
            blocker.close()
            log.flush(timeout=30)
            assert log.pending == 0 and log.refusing() is None
        assert [r.seq for r in A.query(db)] == list(range(1, 101))
        assert V.verify(db, key.public_key).ok
    finally:
        db.close()


def test_a_full_disk_makes_the_writer_unhealthy_and_nothing_is_lost_when_it_frees() -> None:
    with small_fs("2m") as fs:
        db = open_database(fs / "registry.db")
        key = load_or_create_device_key(fs)
        filler: Path | None = None
        try:
            log = A.AuditLog(db, key, max_retries=2, retry_seconds=3600)
            log.append(entry(0))
            log.flush(timeout=30)
            filler = fill(fs)
            appended = 1
            with pytest.raises(AuditError, match="not written"):
                for _ in range(200):  # until a write needs a page the disk does not have
                    for _ in range(20):
                        appended += 1
                        log.append(entry(appended, size=2000))
                    log.flush(timeout=30)
            # Bounded retries, then unhealthy: no busy loop, the records stay queued.
            assert log.unhealthy is not None and "full" in log.unhealthy
            refusal = log.refusing()
            assert refusal is not None and "cannot be written" in str(refusal)
            assert log.pending > 0
            filler.unlink()
            filler = None
            log.close()  # wakes the writer: the disk has room again, everything is written
            assert log.unhealthy is None
            rows = A.query(db)
            assert len(rows) == appended and rows[-1].seq == appended
            assert V.verify(db, key.public_key).ok
        finally:
            if filler is not None:
                filler.unlink()
            db.close()


# --- repeated denials --------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, subject: Any, action: str, resource: str, decision: str, outcome: str,
                 details: dict[str, Any]) -> None:
        self.rows.append({"subject": subject, "action": action, "resource": resource,
                          "decision": decision, "outcome": outcome, "details": details})

    def accounted(self) -> int:
        return sum(r["details"].get("count", 0) if "summary" in r["details"] else 1
                   for r in self.rows)


def test_repeats_within_the_window_become_one_counted_summary() -> None:
    now = [0.0]
    rec = Recorder()
    d = DenialSummaries(rec, 60, per_route=3, clock=lambda: now[0])

    def deny(peer: str = "uid:1234", route: str = "POST /v1/chat/completions",
             reason: str = "denied: no binding") -> None:
        d.deny(peer, route, "uid:1234(bob)", "inference:invoke", "model:x", "denied",
               {"reason": reason, "status": 403})

    for _ in range(100):
        deny()
    deny(peer="uid:1235")  # another peer: its own first record
    assert len(rec.rows) == 2 and d.pending == 99
    now[0] = 59.9
    assert d.sweep() == 0
    now[0] = 60.0
    assert d.sweep() == 1  # the window closed: one summary of the 99 repeats
    summary = rec.rows[-1]
    assert summary["resource"] == "route:POST /v1/chat/completions"
    assert summary["decision"] == "deny" and summary["details"]["count"] == 99
    assert summary["details"]["summary"].startswith(
        "99 more denials of POST /v1/chat/completions by uid:1234(bob) between ")
    assert summary["details"]["status"] == 403
    deny()  # a new window: recorded in full again
    assert rec.rows[-1]["resource"] == "model:x"
    # Many reasons from one peer and route: at most per_route open, then they share one.
    for n in range(10):
        deny(reason=f"denied: model m{n}")
    assert d.flush() >= 1
    assert rec.accounted() == 100 + 1 + 1 + 10
    other = [r for r in rec.rows if r["details"].get("reason") == OTHER_REASONS]
    # m0, m1 open their own windows (3 with the first reason); m2 opens the shared one
    # (recorded in full), m3..m9 are counted there.
    assert len(other) == 1 and other[0]["details"]["count"] == 7
    reasons = other[0]["details"]["reasons"]
    assert len(reasons) == 3 and sum(reasons.values()) + other[0]["details"]["unlisted"] == 7
    assert d.pending == 0 and d.flush() == 0


def test_a_flood_of_denials_is_recorded_in_summary_form(tmp_path: Path) -> None:
    # 2,000 denied requests used to make 2,000 records (+35 MB with long paths); now the
    # first of each (peer, route, reason) is recorded and the rest counted, nothing lost.
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("bindings:\n  - uid: 0\n    role: viewer\n")
    home = tmp_path / "home"
    chats, loads = 300, 40
    with running(home, {"EDGE_AGENT_SECURITY__RBAC_FILE": str(rbac)}) as d, d.client() as c:
        for _ in range(chats):
            r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": []})
            assert r.status_code == 403, r.text
        for i in range(loads):
            assert c.post(f"/agent/v1/models/m{i}/load").status_code == 403
        assert c.get("/agent/v1/device").status_code == 200  # what viewer may do still works
    with sqlite3.connect(home / "registry.db") as conn:
        rows = conn.execute("SELECT resource, details FROM audit_records WHERE decision = "
                            "'deny' ORDER BY seq").fetchall()
    conn.close()
    details = [json.loads(d) for _r, d in rows]
    accounted = sum(x["count"] if "summary" in x else 1 for x in details)
    assert accounted == chats + loads
    assert len(rows) <= 4, rows  # a first and a summary per route, however many requests
    summaries = [x for x in details if "summary" in x]
    assert sorted(x["count"] for x in summaries) == [loads - 1, chats - 1]
    db = open_database(home / "registry.db")
    try:
        assert V.verify(db, load_device_public_key(home), head_file=home / "audit-head").ok
    finally:
        db.close()


# --- the free-disk watermark -------------------------------------------------------------


def test_below_the_disk_watermark_audited_work_gets_503_and_readyz_says_why() -> None:
    with small_fs("48m") as fs:
        home = fs / "home"
        env = {"EDGE_AGENT_SECURITY__AUDIT_MIN_FREE_BYTES": str(16 * MiB)}
        with running(home, env) as d, d.client() as c:
            assert c.get("/readyz").status_code == 200
            assert d.metric("edge_agent_audit_refusing") == 0
            filler = fill(fs, leave=8 * MiB)
            wait_until("readyz to report the low disk",
                       lambda: c.get("/readyz").status_code == 503)
            ready = c.get("/readyz")
            assert ready.json()["status"] == "not_ready"
            assert "below the 16 MiB watermark" in ready.json()["reason"]
            r = c.post("/agent/v1/policy/reload")  # must be audited: refused, not unrecorded
            assert r.status_code == 503 and r.headers["Retry-After"] == "60"
            assert r.json()["error"]["code"] == "audit_unavailable"
            assert "audit_min_free_bytes" in r.json()["error"]["message"]
            assert c.get("/agent/v1/device").status_code == 200  # not audited: still served
            assert d.metric("edge_agent_audit_refusing") == 1
            assert d.metric("edge_agent_home_free_bytes") < 16 * MiB
            filler.unlink()
            wait_until("readyz to recover", lambda: c.get("/readyz").status_code == 200)
            assert c.post("/agent/v1/policy/reload").status_code == 200
        with sqlite3.connect(home / "registry.db") as conn:
            outcomes = conn.execute("SELECT action, outcome FROM audit_records WHERE action "
                                    "= 'policy:write'").fetchall()
        conn.close()
        # The reload itself and the request: the refused request left nothing to record.
    assert outcomes == [("policy:write", "ok"), ("policy:write", "200")]
