"""Benchmark: per-request cost of access control in-process (goal: median ≤ 200 µs).

One "request" is what `agent.api.access` does for a caller before and after the handler:
the identity lookup (IdentityCache, warm), `authorize` against a realistic policy, and an
audit append. Token callers add `TokenStore.verify` on its cached path (the SQLite row
re-read that makes revocation immediate; Argon2 is cached). Timed per iteration with
perf_counter_ns, interleaved with a same-process baseline (a dict lookup) whose ratio
survives a noisy machine. Writes bench/results/authz.json.

The audit append is the daemon's real one by default (`--audit log`: AuditLog behind
agent.security.audit.audit_recorder, its writer thread hashing and committing batches meanwhile); an
in-memory list (`--audit memory`) or nothing (`--audit none`) isolate the rest. Durable
throughput of the log itself is bench/authz_audit.py.

    .venv/bin/python bench/authz.py [--iterations 100000] [--audit log|memory|none]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.security.authz import authorize, load_policy
from agent.security.identity import IdentityCache, PeerCredentials, token_subject
from agent.security.tokens import TokenStore, default_hasher
from localdb import open_database

RESULTS = Path(__file__).resolve().parent / "results" / "authz.json"
GOAL_US = 200.0

POLICY = """
bindings:
  - uid: 0
    role: admin
  - uid: self
    role: admin
  - group: edge-agent-clients
    role: app
  - user: kiosk
    role: app
    models: [smollm2-135m]
  - group: ops
    role: operator
  - group: watchers
    role: viewer
  - token: ci
    role: app
    models: [smollm2-135m]
"""


def fake_lookup(uid: int, gid: int | None) -> tuple[str | None, frozenset[str]]:
    # A user in nine groups, the clients group last: the worst realistic case.
    return "alice", frozenset([f"g{i}" for i in range(8)] + ["edge-agent-clients"])


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def summary(us: list[float]) -> dict[str, float]:
    us = sorted(us)
    return {"median": statistics.median(us), "p99": us[int(len(us) * 0.99) - 1],
            "min": us[0], "mean": statistics.fmean(us)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--audit", choices=["log", "memory", "none"], default="log")
    args = ap.parse_args()
    n = args.iterations

    tmp = Path(tempfile.mkdtemp(prefix="ea-bench-"))
    (tmp / "rbac.yaml").write_text(POLICY)
    policy = load_policy(tmp / "rbac.yaml")
    ids = IdentityCache(lookup=fake_lookup)
    cred = PeerCredentials(pid=4321, uid=1000, gid=1000)
    records: list[tuple[Any, ...]] = []
    db = open_database(tmp / "registry.db")
    audit_log = None
    if args.audit == "log":
        # The daemon's own path: AuditLog (hash chain, batched writer thread, SQLite)
        # behind the same adapter app.py installs.
        from agent.security.audit import AuditLog, audit_recorder
        from agent.security.keys import load_or_create_device_key

        audit_log = AuditLog(db, load_or_create_device_key(tmp))
        record = audit_recorder(audit_log)

    def audit(*entry: Any) -> None:
        if audit_log is not None:
            record(*entry)
        elif args.audit == "memory":
            records.append(entry)
            if len(records) > 10_000:
                records.clear()

    def uid_request() -> None:
        s = ids.subject(cred)
        d = authorize(policy, s, "inference:invoke", "smollm2-135m")
        assert d.allowed
        audit(s, "inference:invoke", "model:smollm2-135m", "allow", "ok",
              {"binding": d.binding, "latency_ms": 1.0})

    store = TokenStore(db, cache_ttl=3600)
    token, _ = store.create("ci", "viewer")
    store.verify(token)  # the one Argon2 verification; later ones hit the cache

    def token_request() -> None:
        info = store.verify(token)
        s = token_subject(info.name, info.role, cred)
        d = authorize(policy, s, "inference:invoke", "smollm2-135m")
        assert d.allowed
        audit(s, "inference:invoke", "model:smollm2-135m", "allow", "ok",
              {"binding": d.binding, "latency_ms": 1.0})

    table = {str(i): i for i in range(1000)}

    def baseline() -> None:
        table.get("500")

    t0 = time.perf_counter()
    hasher = default_hasher()
    stored = hasher.hash("x" * 43)
    argon2_ms = 0.0
    for _ in range(5):
        t = time.perf_counter()
        hasher.verify(stored, "x" * 43)
        argon2_ms += (time.perf_counter() - t) * 1000 / 5
    for fn in (uid_request, token_request, baseline):
        timed(fn, min(n, 5000))  # warm up
    # Interleaved in chunks so drift on a shared machine hits all three alike.
    uid_us: list[float] = []
    tok_us: list[float] = []
    base_us: list[float] = []
    chunk = max(1, n // 20)
    for _ in range(n // chunk):
        uid_us += timed(uid_request, chunk)
        tok_us += timed(token_request, chunk)
        base_us += timed(baseline, chunk)
    store.close()
    if audit_log is not None:
        audit_log.close()  # flushes: every appended record is written before we finish
    db.close()

    uid_s, tok_s, base_s = summary(uid_us), summary(tok_us), summary(base_us)
    result = {
        "benchmark": "authz",
        "iterations": len(uid_us),
        "audit": args.audit,
        "uid_request_us": uid_s,
        "token_request_cached_us": tok_s,
        "baseline_dict_lookup_us": base_s,
        "ratio_uid_median_to_baseline": uid_s["median"] / base_s["median"],
        "argon2_verify_uncached_ms": argon2_ms,
        "goal_median_us": GOAL_US,
        "meets_goal": uid_s["median"] <= GOAL_US and tok_s["median"] <= GOAL_US,
        "wall_s": time.perf_counter() - t0,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"uid request   (identity+authorize+audit): median {uid_s['median']:.2f} µs, "
          f"p99 {uid_s['p99']:.2f} µs")
    print(f"token request (verify cached+authorize+audit): median {tok_s['median']:.2f} µs, "
          f"p99 {tok_s['p99']:.2f} µs")
    print(f"baseline dict lookup: median {base_s['median']:.3f} µs "
          f"(uid ratio {result['ratio_uid_median_to_baseline']:.1f}x)")
    print(f"argon2 verify, uncached: {argon2_ms:.1f} ms; goal median ≤ {GOAL_US:.0f} µs: "
          f"{'met' if result['meets_goal'] else 'NOT met'}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
