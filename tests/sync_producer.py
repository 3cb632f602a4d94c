"""Writes audit records and telemetry into a device's database while its daemon runs, as
the daemon's own writers would (its AuditLog, its outbox); prints progress. For the sync
tests: `python sync_producer.py HOME N_AUDIT N_TELEMETRY`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.security.audit import AuditEntry, AuditLog
from agent.security.keys import load_or_create_device_key
from agent.sync.outbox import Outbox
from localdb import StateDir, open_database


def main(home: Path, n_audit: int, n_telemetry: int) -> None:
    db = open_database(StateDir(home).db)
    outbox = Outbox(db, quotas={"telemetry": 1 << 30}, alarms={})
    log = AuditLog(db, load_or_create_device_key(home), checkpoint_every=500)
    steps = max(n_audit, n_telemetry)
    for i in range(steps):
        if i < n_audit:
            log.append(AuditEntry(subject="uid:0(root)", uid=0, pid=1, action="test:produce",
                                  resource=f"item:{i}", decision="allow", outcome="ok",
                                  details={"i": i}))
        if i < n_telemetry:
            outbox.add("telemetry", {"snapshot": {"boot": "producer", "uptime_s": float(i),
                                                  "rss_bytes": 1, "cpu_percent": 0.0,
                                                  "disk_free_bytes": 1, "disk_total_bytes": 2,
                                                  "models": {}, "errors": {}, "backlog": {}}})
        if i % 500 == 499:
            log.flush()
            print(f"progress {i + 1}", flush=True)
            time.sleep(0.01)  # spread production over time: the link flushes meanwhile
    log.close()
    db.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
