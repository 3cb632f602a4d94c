"""Crash consistency: the agent SIGKILLed at random moments during a model import, a
deployment's install, audit appends and an outbox flush, then restarted through its own
recovery paths, and checked each time:

1. SQLite `PRAGMA integrity_check` is ok (on the file exactly as the kill left it);
2. `audit verify` is ok (the function `edge-agent audit verify` calls, with the home's
   recorded heads), and no audit record the child reported durable is missing;
3. after recovery (the registry's open: tmp/ swept, unreferenced blobs collected) no blob
   is without a record, and 4. no record is without its blob;
5. no outbox message is lost: each one the child reported committed is still in the
   device's outbox or stored by the real controller (and after a final restart, all are).

Iterations: EDGE_TEST_CRASH_ITERATIONS (default 25, spread over the four phases; set it
to hundreds for a long run), seed: EDGE_TEST_CRASH_SEED (printed; set it to replay a run).

How each phase is driven (a 2-core CI machine; the daemon takes 2-3.5 s to start, so 25
daemon restarts alone would exceed the budget): the child is a small driver,
tests/crash_driver.py, running one operation through the agent's own classes and printing
a marker at each durable step. The test kills it after a random number of markers plus a
random delay (drawn from the seeded RNG), and counts a kill as mid-operation when the
child had printed `begin` and never `done`.

- import: `Registry.import_file` of SmolLM2 (98 MB, one marker per MiB copied) in a copy
  of one prepared home; restart = `open_registry` (the recovery every open runs).
- audit: `AuditLog` appends with a checkpoint every 7 records (signing, the head file),
  flushed each round; restart = a new `AuditLog` on the same database, one more record
  and a clean close (a checkpoint), then verify.
- outbox: the real `SyncService` flushing telemetry and audit to a real mosquitto (mTLS)
  and the real controller (its ingest worker confirms what it stored), while the child
  keeps enqueueing. One device home through all iterations: outbox ids are never reused
  and the controller de-duplicates by id, so a copied home would resend ids it already
  has. The next iteration's child is the restart; a final unkilled one drains it all.
- deploy: a full deployment per iteration (daemon start, download, smoke test, restart)
  costs ~10 s, so the kill targets the install step: a signed document applied by the
  daemon's own `DeployManager` as `create_app` wires it, with the download already complete
  in downloads/ (download interruption is tests/test_deploy.py's), killed a random time
  after the last download step, within the measured time to `installed`; restart = the
  daemon's start-up `_resume()`, stopped when the switch (smoke test, seconds here) starts,
  except in the last iteration, which must finish the deployment. The artifact URL points
  at a closed port: a resume must finish from what is on disk, never fetch again.

Found by this test and fixed: a kill after a deployment's download was verified and renamed
to its file name, or after the registry had renamed it into the store but before the
record, made the restart download the whole artifact again (the resume only looked for
`<sha256>.part`; recovery collected the unrecorded blob).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest_models import make_tiny_gguf
from fleet_env import Broker, Controller, Pki
from sqlalchemy import select

from agent.security.audit import AuditEntry, AuditLog
from agent.security.audit_verify import verify
from agent.security.keys import load_device_public_key, load_or_create_device_key, open_device_key
from agent.sync import enroll
from controller.tables import AuditRecord, Telemetry
from fleet.deploy import DesiredState, Limits, ModelDoc, Source, VariantDoc, public_key_id, sign
from localdb import StateDir, open_database
from registry.service import open_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DRIVER = Path(__file__).with_name("crash_driver.py")
ITERATIONS = int(os.environ.get("EDGE_TEST_CRASH_ITERATIONS", "25"))
SEED = int(os.environ.get("EDGE_TEST_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
SHARES = {"import": 8, "audit": 8, "outbox": 5, "deploy": 4}  # of 25; scaled to ITERATIONS
CHILD_TIMEOUT = 120.0


def iterations(phase: str) -> int:
    total = sum(SHARES.values())
    return max(1, round(ITERATIONS * SHARES[phase] / total))


def rng(phase: str) -> random.Random:
    return random.Random(f"{SEED}:{phase}")


@dataclass
class Report:
    phase: str
    iterations: int = 0
    mid: int = 0
    failures: list[str] = field(default_factory=list)
    left: Counter[str] = field(default_factory=Counter)  # what the kills left behind

    def line(self) -> str:
        left = ", ".join(f"{k} {v}" for k, v in sorted(self.left.items()))
        return (f"crash[{self.phase}] seed {SEED}: {self.iterations} iterations, {self.mid} "
                f"killed mid-operation, {len(self.failures)} failures; left: {left}")


@pytest.fixture(scope="module")
def reports() -> Iterator[list[Report]]:
    out: list[Report] = []
    yield out
    print(f"\ncrash consistency, seed {SEED} (EDGE_TEST_CRASH_SEED={SEED} replays it):")
    for r in out:
        print("  " + r.line())


# -- running and killing a child -----------------------------------------------------------


@dataclass
class Run:
    lines: list[tuple[float, str]]  # (monotonic time read, text)
    killed: bool
    rc: int
    stderr: str

    def has(self, marker: str) -> bool:
        return any(text == marker or text.startswith(marker + " ") for _, text in self.lines)

    @property
    def mid(self) -> bool:
        return self.killed and self.has("begin") and not self.has("done")

    def values(self, prefix: str) -> list[list[str]]:
        return [t[len(prefix):].split() for _, t in self.lines if t.startswith(prefix)]


KillAt = Callable[[list[tuple[float, str]]], float | None]  # lines so far -> delay, or wait


class Zygote:
    """tests/crash_driver.py in zygote mode: imports once, forks one child per run."""

    def __init__(self, phase: str, log: Path) -> None:
        self.log = log
        self.err = log.open("w")
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "zygote", phase],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, name=f"crash-{phase}", daemon=True)
        self.thread.start()
        line = self._next(60, "the zygote to import")
        assert line == "ready", f"zygote: {line!r} {log.read_text()[-2000:]}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, timeout: float, what: str, seen: list[tuple[float, str]] | None = None
              ) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = [t for _, t in (seen or [])][-5:]
            raise AssertionError(f"no output within {timeout:.0f}s waiting for {what} (last: "
                                 f"{tail}): {self.log.read_text()[-2000:]}") from None
        if line is None:
            raise AssertionError(f"the zygote exited: {self.log.read_text()[-3000:]}")
        return line

    def run(self, args: list[str], env: dict[str, str], kill_at: KillAt | None,
            timeout: float = CHILD_TIMEOUT) -> Run:
        """Fork a child for `args`; after each marker `kill_at` may answer a delay: then
        SIGKILL. Returns once the child has ended."""
        assert self.proc.stdin is not None
        offset = self.log.stat().st_size
        self.proc.stdin.write(" ".join([*(f"{k}={v}" for k, v in env.items()), *args]) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        seen: list[tuple[float, str]] = []
        pid = 0
        killed = False
        while True:
            line = self._next(max(0.0, deadline - time.monotonic()), f"{args[0]} markers",
                              seen)
            if not line:
                continue
            if line.startswith("pid ") and pid == 0:
                pid = int(line.split()[1])
                continue
            if line.startswith(f"exit {pid} "):
                rc = int(line.split()[2])
                break
            seen.append((time.monotonic(), line))
            if killed or kill_at is None:
                continue
            delay = kill_at(seen)
            if delay is not None:
                time.sleep(delay)  # the random moment itself, not synchronisation
                with contextlib.suppress(ProcessLookupError):  # it ended before the moment
                    os.kill(pid, signal.SIGKILL)
                killed = True
        with self.log.open() as f:
            f.seek(offset)
            stderr = f.read()
        run = Run(seen, killed and rc == -signal.SIGKILL, rc, stderr)
        if not run.killed:
            assert rc == 0, f"{args[0]} child failed ({rc}): {stderr[-3000:]}"
        return run

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.err.close()


@pytest.fixture
def zygotes(tmp_path: Path) -> Iterator[Callable[[str], Zygote]]:
    made: list[Zygote] = []

    def make(phase: str) -> Zygote:
        made.append(Zygote(phase, tmp_path / f"{phase}-children.log"))
        return made[-1]

    yield make
    for z in made:
        z.close()


def child_env(home: Path, **extra: str) -> dict[str, str]:
    return {"EDGE_AGENT_HOME": str(home), "EDGE_AGENT_RUNTIME__THREADS": "2", **extra}


def after_markers(r: random.Random, begin: str, markers: int, prefix: str,
                  tail: float, tail_share: float = 0.25) -> KillAt:
    """Kill after a random number (0..markers) of `prefix` markers following `begin`, plus a
    random delay: up to the mean gap between markers, or up to `tail` seconds after the
    last one (chosen with probability `tail_share`: the commit steps after the last
    marker are short but they are where a crash can split a change in two)."""
    k = markers if r.random() < tail_share else r.randint(0, markers - 1)
    frac = r.random()
    state: dict[str, float] = {}

    def decide(lines: list[tuple[float, str]]) -> float | None:
        t, text = lines[-1]
        if text == begin:
            state["t0"] = t
            state["n"] = 0
        elif "t0" in state and text.startswith(prefix):
            state["n"] += 1
        else:
            return None
        if state["n"] < k:
            return None
        gap = (t - state["t0"]) / state["n"] if state["n"] else 0.02
        return frac * (tail if k == markers else min(gap, tail))

    return decide


# -- the checks ----------------------------------------------------------------------------


def integrity(home: Path) -> list[str]:
    with sqlite3.connect(StateDir(home).db) as db:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    return [] if rows == [("ok",)] else [f"integrity_check: {rows[:5]}"]


def audit_ok(home: Path) -> list[str]:
    state = StateDir(home)
    db = open_database(state.db)
    try:
        result = verify(db, load_device_public_key(home), head_file=state.audit_head)
    finally:
        db.close()
    return [] if result.ok else [f"audit verify: {result.line()}"]


def recorded(home: Path) -> set[str]:
    with sqlite3.connect(StateDir(home).db) as db:
        shas = {r[0] for r in db.execute("SELECT sha256 FROM artifacts")}
        shas |= {r[0] for r in db.execute("SELECT sha256 FROM variants WHERE sha256 IS NOT NULL")}
        shas |= {r[0] for r in db.execute("SELECT sha256 FROM variant_files")}
    return shas


def blobs_match_records(home: Path) -> list[str]:
    """Recovery as every open runs it, then blobs == records (both ways); tmp/ empty."""
    reg = open_registry(home)
    try:
        blobs = reg.store.digests()
        leftovers = list(reg.store.tmp_dir.iterdir())
    finally:
        reg.close()
    rec = recorded(home)
    out = []
    if blobs - rec:
        out.append(f"blobs without a record after GC: {sorted(blobs - rec)}")
    if rec - blobs:
        out.append(f"records without their blob: {sorted(rec - blobs)}")
    if leftovers:
        out.append(f"store tmp/ not swept: {leftovers}")
    return out


def left_behind(home: Path) -> list[str]:
    """What the kill left, before any recovery (for the report)."""
    state = StateDir(home)
    found = []
    tmp = state.store / "tmp"
    if tmp.is_dir() and any(tmp.iterdir()):
        found.append("partial ingest in tmp/")
    blobs_dir = state.store / "blobs" / "sha256"
    blobs = {p.name for p in blobs_dir.glob("*/*")} if blobs_dir.is_dir() else set()
    if blobs - recorded(home):
        found.append("blob without record")
    downloads = state.downloads
    if downloads.is_dir():
        for p in downloads.iterdir():
            found.append("download .part" if p.suffix == ".part" else "verified download")
    return found


def copy_home(template: Path, dest: Path) -> Path:
    """A copy of a prepared home; files over 1 MB are hard links (never written in place:
    the store renames, so the template keeps its content)."""
    def link_or_copy(src: str, dst: str) -> None:
        if os.path.getsize(src) > 1 << 20:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(template, dest, copy_function=link_or_copy, symlinks=True)
    return dest


def audited_home(home: Path) -> Path:
    """A home with its device key and a signed audit log of ten records."""
    home.mkdir(mode=0o750)
    state = StateDir(home)
    db = open_database(state.db)
    with AuditLog(db, load_or_create_device_key(home), checkpoint_every=7,
                  head_file=state.audit_head) as log:
        for n in range(10):
            log.append(AuditEntry(subject="s", action="a", resource=f"r{n}", decision="allow",
                                  outcome="ok"))
    db.close()
    return home


# -- import --------------------------------------------------------------------------------


def test_kill_during_import(tmp_path: Path, smollm2_gguf: Path, reports: list[Report],
        zygotes: Callable[[str], Zygote]) -> None:
    rep = Report("import")
    z = zygotes("import")
    reports.append(rep)
    r = rng("import")
    template = audited_home(tmp_path / "template")
    reg = open_registry(template)
    reg.import_file(make_tiny_gguf(tmp_path / "tiny.gguf"), alias="tiny", task="completion")
    reg.close()
    chunks = math.ceil(smollm2_gguf.stat().st_size / (1 << 20))
    for i in range(iterations("import")):
        home = copy_home(template, tmp_path / f"home-{i}")
        run = z.run(["import", str(home), str(smollm2_gguf), "smol"], child_env(home),
                    after_markers(r, "begin", chunks, "chunk", tail=0.4, tail_share=0.4))
        rep.iterations += 1
        rep.mid += run.mid
        rep.left.update(left_behind(home) or ["nothing"])
        problems = integrity(home) + blobs_match_records(home) + audit_ok(home)
        rep.failures += [f"import #{i}: {p}" for p in problems]
        shutil.rmtree(home)
    assert not rep.failures, rep.line() + "\n" + "\n".join(rep.failures)
    assert rep.mid >= max(1, rep.iterations // 3), f"too few kills landed mid-import: {rep.line()}"


# -- audit ---------------------------------------------------------------------------------


def test_kill_during_audit_append(tmp_path: Path, reports: list[Report],
        zygotes: Callable[[str], Zygote]) -> None:
    rep = Report("audit")
    z = zygotes("audit")
    reports.append(rep)
    r = rng("audit")
    template = audited_home(tmp_path / "template")
    rounds, per = 12, 3
    for i in range(iterations("audit")):
        home = copy_home(template, tmp_path / f"home-{i}")
        run = z.run(["audit", str(home), str(rounds), str(per)], child_env(home),
                    after_markers(r, "begin", rounds, "durable audit", tail=0.3))
        rep.iterations += 1
        rep.mid += run.mid
        durable = max((int(v[0]) for v in run.values("durable audit ")), default=0)
        problems = integrity(home) + audit_ok(home)
        with sqlite3.connect(StateDir(home).db) as raw:
            top, signed = raw.execute("SELECT (SELECT MAX(seq) FROM audit_records), (SELECT "
                                      "MAX(seq) FROM audit_checkpoints)").fetchone()
        rep.left.update(["records past the last checkpoint" if top > signed else "all signed"])
        # Restart: a new writer continues the chain from what is on disk and signs it.
        hs = StateDir(home)
        db = open_database(hs.db)
        with AuditLog(db, open_device_key(home), checkpoint_every=7,
                      head_file=hs.audit_head) as log:
            log.append(AuditEntry(subject="s", action="restart", resource="agent",
                                  decision="allow", outcome="ok"))
        with sqlite3.connect(hs.db) as raw:
            count, top = raw.execute("SELECT COUNT(*), MAX(seq) FROM audit_records").fetchone()
        db.close()
        if top <= durable or count != top:
            problems.append(f"records lost: {count} records up to seq {top}, the child "
                            f"reported seq {durable} durable")
        problems += audit_ok(home)
        rep.failures += [f"audit #{i}: {p}" for p in problems]
        shutil.rmtree(home)
    assert not rep.failures, rep.line() + "\n" + "\n".join(rep.failures)
    assert rep.mid >= max(1, rep.iterations // 3), f"too few kills landed mid-append: {rep.line()}"


# -- outbox flush --------------------------------------------------------------------------


def _controller_has(controller: Controller, device: str) -> tuple[set[int], set[int]]:
    with controller.store.engine.connect() as conn:
        tel = {r for (r,) in conn.execute(select(Telemetry.record_id).where(
            Telemetry.device_id == device))}
        aud = {r for (r,) in conn.execute(select(AuditRecord.seq).where(
            AuditRecord.device_id == device))}
    return tel, aud


def _device_pending(home: Path) -> tuple[set[int], set[int]]:
    with sqlite3.connect(StateDir(home).db) as db:
        tel = {r for (r,) in db.execute("SELECT id FROM sync_outbox WHERE cls = 'telemetry'")}
        row = db.execute("SELECT value FROM sync_state WHERE key = 'cursor:audit'").fetchone()
        cursor = row[0] if row else 0
        aud = {r for (r,) in db.execute("SELECT seq FROM audit_records WHERE seq > ?",
                                        (cursor,))}
    return tel, aud


def enroll_in_process(home: Path, pki: Pki, controller: Controller | None = None) -> str:
    """enroll → approve → install-cert through the functions the two CLIs call."""
    approved = pki.keys.approve(enroll.enroll(home, pki.fleet))
    if controller is not None:
        controller.store.add_device(approved)
    enroll.install_cert(home, approved.cert_pem, pki.ca.read_bytes(),
                        pki.signing_pub.read_bytes())
    return approved.device_id


def test_kill_during_outbox_flush(tmp_path: Path, pki: Pki, broker: Broker,
                                  controller: Controller, reports: list[Report],
        zygotes: Callable[[str], Zygote]) -> None:
    rep = Report("outbox")
    z = zygotes("outbox")
    reports.append(rep)
    r = rng("outbox")
    home = tmp_path / "device"
    home.mkdir(mode=0o750)
    open_database(StateDir(home).db).close()
    device = enroll_in_process(home, pki, controller)
    env = child_env(home, EDGE_AGENT_SYNC__BROKER_HOST="127.0.0.1",
                    EDGE_AGENT_SYNC__BROKER_PORT=str(broker.port),
                    EDGE_AGENT_SYNC__BATCH_RECORDS="8",
                    EDGE_AGENT_SYNC__FLUSH_MESSAGES_PER_SECOND="40",
                    EDGE_AGENT_SYNC__TELEMETRY_SECONDS="3600",
                    EDGE_AGENT_SYNC__RECONNECT_MIN_SECONDS="0.2",
                    EDGE_AGENT_SYNC__RECONNECT_MAX_SECONDS="1",
                    EDGE_AGENT_SYNC__CONFIRM_TIMEOUT_SECONDS="3")
    rounds, per = 8, 12
    tel_made: set[int] = set()
    aud_made = 0
    for i in range(iterations("outbox")):
        run = z.run(["outbox", str(home), str(rounds), str(per)], env,
                    after_markers(r, "begin", 2 * rounds, "enqueued", tail=0.5))
        rep.iterations += 1
        rep.mid += run.mid
        for first, last in run.values("enqueued telemetry "):
            tel_made |= set(range(int(first), int(last) + 1))
        aud_made = max([aud_made, *(int(v[0]) for v in run.values("enqueued audit "))])
        problems = integrity(home) + audit_ok(home)
        pending_t, pending_a = _device_pending(home)
        got_t, got_a = _controller_has(controller, device)
        lost_t = tel_made - pending_t - got_t
        lost_a = set(range(1, aud_made + 1)) - pending_a - got_a
        if lost_t or lost_a:
            problems.append(f"lost: telemetry {sorted(lost_t)[:10]} ({len(lost_t)}), audit "
                            f"{sorted(lost_a)[:10]} ({len(lost_a)})")
        rep.left.update(["records in flight (sent, not released)"] if (pending_t & got_t)
                        else ["pending only" if pending_t or pending_a else "nothing pending"])
        rep.failures += [f"outbox #{i}: {p}" for p in problems]
    # The restart that finishes: every record ever reported committed reaches the controller.
    final = z.run(["outbox", str(home), "1", "4"], env, None)
    for first, last in final.values("enqueued telemetry "):
        tel_made |= set(range(int(first), int(last) + 1))
    pending_t, pending_a = _device_pending(home)
    got_t, got_a = _controller_has(controller, device)
    if pending_t or pending_a:
        rep.failures.append(f"outbox not empty after the final flush: {len(pending_t)} "
                            f"telemetry, {len(pending_a)} audit")
    if tel_made - got_t or set(range(1, aud_made + 1)) - got_a:
        rep.failures.append(f"never delivered: telemetry {sorted(tel_made - got_t)[:10]}, "
                            f"audit {sorted(set(range(1, aud_made + 1)) - got_a)[:10]}")
    rep.failures += [f"outbox final: {p}" for p in integrity(home) + audit_ok(home)]
    print(f"\noutbox: {len(tel_made)} telemetry and {aud_made} audit records committed by the "
          f"children, {len(got_t)} and {len(got_a)} at the controller")
    assert not rep.failures, rep.line() + "\n" + "\n".join(rep.failures)
    assert rep.mid >= max(1, rep.iterations // 3), f"too few kills landed mid-flush: {rep.line()}"


# -- deployment install --------------------------------------------------------------------


def _deployment(home: Path) -> tuple[str, Any]:
    with sqlite3.connect(StateDir(home).db) as db:
        row = db.execute("SELECT state, reason FROM sync_deployments ORDER BY id DESC "
                         "LIMIT 1").fetchone()
        active = db.execute("SELECT active_variant FROM models WHERE alias = 'smol'").fetchone()
    return (row[0] if row else "none"), (active[0] if active else None)


def test_kill_during_deployment_install(tmp_path: Path, pki: Pki, smollm2_gguf: Path,
                                        reports: list[Report],
        zygotes: Callable[[str], Zygote]) -> None:
    rep = Report("deploy")
    z = zygotes("deploy")
    reports.append(rep)
    r = rng("deploy")
    template = tmp_path / "template"
    template.mkdir(mode=0o750)
    open_registry(template).close()
    device = enroll_in_process(template, pki)
    sha, size = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", \
        smollm2_gguf.stat().st_size
    downloads = StateDir(template).downloads
    downloads.mkdir(mode=0o750)
    shutil.copyfile(smollm2_gguf, downloads / f"{sha}.part")  # the download, complete
    signing = pki.keys.signing_key()
    doc = DesiredState(
        fleet=pki.fleet, device=device, version=1, deployment="crash-1", created=time.time(),
        models=[ModelDoc(alias="smol", task="chat", smoke_prompt="Hi", variants=[VariantDoc(
            name="gguf-q4_1-cpu", format="gguf", quantization="Q4_1", size=size, sha256=sha,
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            source=Source(https="https://127.0.0.1:9/smol.gguf"))])],
        limits=Limits(disk_reserve_bytes=0))
    document = tmp_path / "desired.json"
    document.write_bytes(sign(doc, signing, public_key_id(signing.public_key())))
    # Seconds from the first download step to `installed`, from one run left alone (its
    # markers are read as they come, so their times are true; a killed run's markers after
    # the kill are read late). The kills then land inside it: on a fast machine the whole
    # install takes ~0.1 s, and a fixed guess (0.8 s) let every kill land after it.
    calibration = z.run(["deploy", str(copy_home(template, tmp_path / "calibrate")),
                         str(document)], child_env(tmp_path / "calibrate"), None)
    first: dict[str, float] = {}
    for when, text in calibration.lines:
        if text.startswith("step "):
            first.setdefault(text.split()[1], when)
    window = first["installed"] - first["downloading"]
    assert window > 0, calibration.lines
    shutil.rmtree(tmp_path / "calibrate")
    for i in range(iterations("deploy")):
        home = copy_home(template, tmp_path / f"home-{i}")
        delay = r.uniform(0, 0.9 * window)

        def kill_at(lines: list[tuple[float, str]], delay: float = delay) -> float | None:
            return delay if lines[-1][1].startswith("step downloading") else None

        run = z.run(["deploy", str(home), str(document)], child_env(home), kill_at)
        rep.iterations += 1
        steps = [t.split()[1] for _, t in run.lines if t.startswith("step ")]
        mid_install = run.killed and "downloading" in steps and "installed" not in steps
        rep.mid += mid_install
        print(f"deploy #{i}: kill {delay:.2f}s after the download step, steps seen {steps}, "
              f"rc {run.rc}")
        left = left_behind(home) or ["nothing"]
        rep.left.update(left)
        problems = integrity(home) + audit_ok(home)
        # Restart: the daemon's start-up resume of the accepted deployment.
        # Restart. The artifact server does not exist: a resume that fetches again never
        # ends (killed at once). The install is what is tested: the resume is killed again
        # when the switch starts (a smoke test costs seconds here), except the last one,
        # which must finish the deployment.
        last = i == iterations("deploy") - 1

        def stop_at(lines: list[tuple[float, str]], last: bool = last) -> float | None:
            text = lines[-1][1]
            stop = text.startswith("fetching again") or (
                not last and text.startswith("step smoke-testing"))
            return 0.0 if stop else None

        resumed = z.run(["resume", str(home)], child_env(home), stop_at, timeout=90)
        if any(t.startswith("fetching again") for _, t in resumed.lines):
            problems.append(f"the restart fetched the artifact again ({resumed.lines[-1][1]}) "
                            f"though the kill left {left}")
        state, active = _deployment(home)
        if last and (state != "done" or active != "gguf-q4_1-cpu"):
            problems.append(f"deployment {state} (active variant {active}) after the restart; "
                            f"{resumed.stderr[-1500:]}")
        extra = sorted(p.name for p in StateDir(home).downloads.iterdir())
        if extra:
            problems.append(f"downloads/ still holds {extra} after the install")
        problems += integrity(home) + blobs_match_records(home) + audit_ok(home)
        if sha not in recorded(home):
            problems.append("the deployed variant's blob is not recorded")
        rep.failures += [f"deploy #{i} (killed {delay:.2f}s after downloading): {p}"
                         for p in problems]
        shutil.rmtree(home)
    assert not rep.failures, rep.line() + "\n" + "\n".join(rep.failures)
    assert rep.mid >= max(1, rep.iterations // 3), f"too few kills landed mid-install: {rep.line()}"
