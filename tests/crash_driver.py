"""The child that tests/test_crash_consistency.py SIGKILLs: one operation of the agent,
through the agent's own classes, printing a marker line (flushed) at each step so the test
can kill it at a random moment inside the operation and knows what was durable by then.

    crash_driver.py import HOME FILE ALIAS     registry import (copy into the blob store)
    crash_driver.py audit HOME ROUNDS PER      audit appends, a flush after each round
    crash_driver.py outbox HOME ROUNDS PER     telemetry + audit enqueued while the real
                                               sync service flushes them to the broker
    crash_driver.py deploy HOME DOCUMENT       a signed deployment applied by the daemon's
                                               own DeployManager (as create_app wires it)
    crash_driver.py resume HOME                the daemon's start-up resume of deployments

Markers: `begin` when the operation starts, `done` when it has finished; in between,
lines naming what is durable (`durable audit SEQ`, `enqueued telemetry FIRST LAST`, ...).

    crash_driver.py zygote PHASE

imports what PHASE needs once, then for each command line read from stdin forks a child
that runs it (first line `pid N`) and reports `exit N RC` when it ended: a Python start
and its imports take 1-2 s on the CI machine, a fork a few ms. The zygote holds no thread,
file or database connection when it forks; each child is a fresh process of its own, and
SIGKILL ends it as it ends the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


def say(*parts: object) -> None:
    print(*parts, flush=True)


def do_import(home: Path, file: Path, alias: str) -> None:
    from registry.service import open_registry

    reg = open_registry(home)  # the CLI's open: recovery of an interrupted import first
    say("begin")
    reg.import_file(file, alias=alias, task="chat", progress=lambda n: say("chunk", n))
    say("done")
    reg.close()


def do_audit(home: Path, rounds: int, per: int) -> None:
    from agent.security.audit import AuditEntry, AuditLog, tail
    from agent.security.keys import open_device_key
    from localdb import StateDir, open_database

    state = StateDir(home)
    db = open_database(state.db)
    # Small checkpoint interval: signing and the head file (outside the DB) are written
    # often, so kills land in them too.
    log = AuditLog(db, open_device_key(home), checkpoint_every=7, head_file=state.audit_head)
    say("begin")
    for r in range(rounds):
        for i in range(per):
            log.append(AuditEntry(subject="uid:0(root)", uid=0, pid=os.getpid(),
                                  action="models:write", resource=f"model:m{r}-{i}",
                                  decision="allow", outcome="200", details={"round": r}))
        log.flush()
        say("durable audit", tail(db, 1)[0].seq)
    log.close()
    say("done")
    db.close()


async def do_outbox(home: Path, rounds: int, per: int) -> None:
    from agent.metrics import Metrics
    from agent.security.audit import AuditLog, audit_entry, tail
    from agent.security.keys import open_device_key
    from agent.settings import Settings
    from agent.sync.outbox import Outbox
    from agent.sync.service import SyncParts, SyncService
    from localdb import StateDir, open_database

    settings = Settings()
    state = StateDir(home)
    db = open_database(state.db)
    log = AuditLog(db, open_device_key(home), checkpoint_every=20, head_file=state.audit_head)

    def audit(action: str, resource: str, decision: str, outcome: str,
              details: dict[str, Any]) -> None:
        log.append(audit_entry("agent:sync", action, resource, decision, outcome, details))

    outbox = Outbox(db, quotas={"telemetry": settings.sync.quota_telemetry_bytes}, alarms={})
    parts = SyncParts(loaded=dict, models=list, hardware=dict, policy_hashes=dict,
                      audit=audit, gc=list)
    service = SyncService(settings, outbox, Metrics(), parts)
    await service.start()
    deadline = time.monotonic() + 30
    while service.link is None or not service.link.connected:
        if time.monotonic() > deadline:
            raise SystemExit(f"no link to the broker: {service.status()}")
        await asyncio.sleep(0.02)  # the link's own thread connects; this only looks
    say("begin")
    for r in range(rounds):
        ids = [await asyncio.to_thread(outbox.add, "telemetry", _snapshot(r, i))
               for i in range(per)]
        say("enqueued telemetry", ids[0], ids[-1])
        for i in range(per // 4 or 1):
            log.append(audit_entry("uid:0(root)", "models:read", f"model:m{r}-{i}", "allow",
                                   "200", {"round": r}))
        await asyncio.to_thread(log.flush)
        say("enqueued audit", tail(db, 1)[0].seq)
        service.wake()
        await asyncio.sleep(0.02)  # production spread over time: the flusher runs meanwhile
    while sum((await asyncio.to_thread(outbox.backlog)).values()):
        if time.monotonic() > deadline + 60:
            raise SystemExit(f"outbox not drained: {outbox.backlog()}")
        await asyncio.sleep(0.02)
    say("done")
    await service.stop()
    log.close()
    db.close()


def _snapshot(r: int, i: int) -> dict[str, Any]:
    return {"snapshot": {"boot": "crash", "uptime_s": float(r * 1000 + i), "rss_bytes": 1,
                         "cpu_percent": 0.0, "disk_free_bytes": 1, "disk_total_bytes": 2,
                         "models": {}, "errors": {}, "backlog": {}}}


class _Steps(logging.Handler):
    """Prints the deployment steps the DeployManager logs, as markers."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "agent.sync.deploy" and record.args and len(record.args) >= 5:
            say("step", record.args[4], record.getMessage())
        elif "interrupted" in record.getMessage():
            say("fetching again:", record.getMessage())


async def do_deploy(home: Path, document: Path | None) -> None:
    from agent.app import create_app, shutdown
    from agent.settings import Settings
    from agent.state import STATE

    logger = logging.getLogger("agent.sync.deploy")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Steps())
    app = create_app(Settings())  # the daemon's wiring: recovery, registry, audit, deploy
    state = app[STATE]
    await state.scheduler.start()
    deploy = state.sync.deploy
    assert deploy is not None
    say("begin")
    if document is not None:
        await deploy.apply(document.read_bytes())
    else:
        await deploy._resume()  # what the daemon does first when its link starts
    say("done")
    await shutdown(state)


PRELOAD = {
    "import": ["registry.service", "registry.importers"],
    "audit": ["agent.security.audit", "agent.security.keys",
              "cryptography.hazmat.primitives.asymmetric.ed25519"],
    "outbox": ["agent.sync.service", "agent.settings", "agent.metrics", "agent.security.audit",
               "agent.security.keys", "paho.mqtt.client", "httpx",
               "cryptography.hazmat.primitives.asymmetric.ed25519"],
    "deploy": ["agent.app", "agent.settings", "agent.state", "agent.sync.deploy",
               "registry.importers", "registry.selection_index", "httpx",
               "cryptography.hazmat.primitives.asymmetric.ed25519"],
}


def zygote(phase: str) -> None:
    import importlib
    import traceback

    for name in PRELOAD[phase]:
        importlib.import_module(name)
    say("ready")
    for line in sys.stdin:
        args = line.split()
        if not args:
            continue
        env = dict(a.split("=", 1) for a in args if "=" in a)
        args = [a for a in args if "=" not in a]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 0
            try:
                os.environ.update(env)
                say("pid", os.getpid())
                main(args)
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        # On a line of its own even when the child was killed in the middle of one.
        say(f"\nexit {pid} {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode, home = argv[0], Path(argv[1])
    if mode == "zygote":
        zygote(argv[1])
        return
    if mode == "import":
        do_import(home, Path(argv[2]), argv[3])
    elif mode == "audit":
        do_audit(home, int(argv[2]), int(argv[3]))
    elif mode == "outbox":
        asyncio.run(do_outbox(home, int(argv[2]), int(argv[3])))
    elif mode == "deploy":
        asyncio.run(do_deploy(home, Path(argv[2])))
    elif mode == "resume":
        asyncio.run(do_deploy(home, None))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
