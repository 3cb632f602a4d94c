"""The soak (bench/soak.py) at its test size: mixed traffic against the real daemon for
EDGE_TEST_SOAK_SECONDS s (20 in `make test`, inside its 15-minute budget; .ci/run sets the
issue's 60; hours on demand) — streamed chats, embeddings, control calls, bursts
past the queue, policy reloads and model unloads — then its goals: no answer but 2xx and
the deliberate 429s, no growth in open fds or RSS beyond the tolerances it states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("EDGE_TEST_SOAK_SECONDS", "20"))


def test_soak_serves_mixed_traffic_without_errors_or_growth(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", str(SECONDS),
         "--out", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 180,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    kinds = res["codes_by_kind"]
    why = json.dumps({k: res[k] for k in ("codes_by_kind", "cut_at_end", "error_notes", "rest",
                                          "pass")}, indent=1)
    # The traffic was what it says: generation, embeddings, both operations, overload.
    assert kinds["chat"].get("200", 0) >= 1, why
    if res["setup"]["embedding_model"] is not None:
        assert kinds["embeddings"].get("200", 0) >= 1, why
    # issued: on a busy machine an unload can still be waiting for the model's requests
    assert {"unload", "policy reload (SIGHUP)"} <= kinds.keys() | res["cut_at_end"].keys(), why
    assert res["throughput"]["generated_tokens"] > 0, why
    # The goals.
    assert res["errors"] == {}, why
    assert res["pass"]["fds_at_rest"], why
    assert res["pass"]["fd_trend"], json.dumps(res["fds"])
    assert res["pass"]["rss_trend"], json.dumps(res["rss_mb"])
    assert res["all_pass"], why
