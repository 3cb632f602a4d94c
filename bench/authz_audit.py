"""Benchmark, audit part of the authz benchmark: audit append latency and durable throughput.

Goals: >= 5,000 records/s from the first `append()` to a durable `flush()` (hashing,
chaining, checkpoint signing and SQLite commits included), and an `append()` that costs
about a microsecond (it only queues). In the same process, for a ratio that survives a
noisy machine, a baseline: plain `sqlite3.executemany` of the same rows (pre-built tuples,
no hashing, no queue) into a fresh WAL database, in batches of the writer's size. Also
times `verify()` over the result. Writes bench/results/audit.json.

    .venv/bin/python bench/authz_audit.py [--records 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.security.audit import AuditEntry, AuditLog
from agent.security.audit_verify import verify
from agent.security.keys import DeviceKey
from localdb import open_database

RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"
GOAL_RPS = 5_000
BATCH = 5_000


def entries(n: int) -> list[AuditEntry]:
    return [
        AuditEntry(
            subject=f"uid:{1000 + i % 7}(user{i % 7})",
            action="inference:invoke",
            resource="model:smollm2-135m",
            decision="allow" if i % 13 else "deny",
            outcome="200" if i % 13 else "403",
            uid=1000 + i % 7,
            pid=2000 + i % 50,
            details={"model": "smollm2-135m", "prompt_tokens": 20 + i % 300,
                     "completion_tokens": 64 + i % 200, "latency_ms": 35.5 + i % 90},
        )
        for i in range(n)
    ]


def run_audit(work: Path, batch: list[AuditEntry]) -> dict[str, float]:
    db = open_database(work / "registry.db")
    key = DeviceKey.generate()
    lat_ns: list[int] = []
    clock = time.perf_counter_ns
    log = AuditLog(db, key, checkpoint_every=1000, max_batch=BATCH)
    t0 = time.perf_counter()
    for e in batch:
        a = clock()
        log.append(e)
        lat_ns.append(clock() - a)
    t_appended = time.perf_counter()
    log.flush()
    t_durable = time.perf_counter()
    log.close()
    v0 = time.perf_counter()
    result = verify(db, key.public_key)
    v1 = time.perf_counter()
    db.close()
    assert result.ok and result.records == len(batch), result
    lat_ns.sort()
    n = len(batch)
    return {
        "throughput_rps": n / (t_durable - t0),
        "append_loop_rps": n / (t_appended - t0),
        "append_median_us": lat_ns[n // 2] / 1000,
        "append_p99_us": lat_ns[int(n * 0.99)] / 1000,
        "append_max_us": lat_ns[-1] / 1000,
        "verify_rps": n / (v1 - v0),
        "checkpoints": result.checkpoints,
    }


def run_baseline(work: Path, batch: list[AuditEntry]) -> float:
    """Plain sqlite3 executemany of the same rows: no hashing, no queue, no thread."""
    rows = [
        (i + 1, "2026-01-01T00:00:00.000000Z", e.subject, e.uid, e.pid, e.action, e.resource,
         e.decision, str(e.outcome), json.dumps(dict(e.details)), "0" * 64)
        for i, e in enumerate(batch)
    ]
    path = work / "baseline.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, time TEXT, subject TEXT, "
        "uid INTEGER, pid INTEGER, action TEXT, resource TEXT, decision TEXT, outcome TEXT, "
        "details TEXT, digest TEXT)"
    )
    t0 = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO audit_records VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         rows[start:start + BATCH])
        conn.execute("COMMIT")
    t1 = time.perf_counter()
    conn.close()
    return len(rows) / (t1 - t0)


def bench_audit(records: int, repeats: int) -> dict[str, object]:
    batch = entries(records)
    runs: list[dict[str, float]] = []
    baselines: list[float] = []
    # Interleaved so that machine noise hits both sides alike.
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            runs.append(run_audit(Path(tmp), batch))
        with tempfile.TemporaryDirectory(prefix="bench-audit-base-") as tmp:
            baselines.append(run_baseline(Path(tmp), batch))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    base = statistics.median(baselines)
    return {
        "records": records,
        "repeats": repeats,
        "goal_rps": GOAL_RPS,
        **{k: round(v, 2) for k, v in med.items()},
        "baseline_executemany_rps": round(base, 1),
        "ratio_to_baseline": round(med["throughput_rps"] / base, 3),
        "meets_goal": med["throughput_rps"] >= GOAL_RPS,
        "runs": runs,
        "baselines_rps": baselines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    audit = bench_audit(args.records, args.repeats)
    out = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "sqlite": sqlite3.sqlite_version,
        "audit": audit,
    }
    print(f"audit: {audit['records']} records, median of {audit['repeats']} run(s)")
    print(f"  durable throughput  {audit['throughput_rps']:>10,.0f} records/s "
          f"(goal >= {GOAL_RPS:,}: {'met' if audit['meets_goal'] else 'NOT met'})")
    print(f"  append() latency    median {audit['append_median_us']} us, "
          f"p99 {audit['append_p99_us']} us, max {audit['append_max_us']} us")
    print(f"  baseline executemany {audit['baseline_executemany_rps']:>9,.0f} records/s "
          f"(audit/baseline = {audit['ratio_to_baseline']})")
    print(f"  verify()            {audit['verify_rps']:>10,.0f} records/s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
