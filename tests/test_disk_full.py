"""A full disk while a model is imported: a clear error, nothing recorded, nothing left in
the store's tmp/, and the daemon serving on the same home keeps answering.

The disk is a real tmpfs of a few MB (tests/filesystems.py; root, as in CI). A deployment
download that meets a full disk is refused before it starts when the declared size does
not fit (test_deploy.py, "exceeds-disk"); one that fills up mid-way goes through the same
store code as the copy below.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest_models import make_tiny_gguf
from daemon import running
from filesystems import fill, small_fs

from registry.errors import NoSpace
from registry.store import BlobStore

MiB = 1024 * 1024
SMOL = "smollm2-135m"


def agent_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, check=False, env={**env, "EDGE_AGENT_HOME": str(home)})


def test_a_copy_that_fills_the_disk_midway_stores_nothing(tmp_path: Path) -> None:
    """The size looked fine (a pipe says 0 bytes), then the disk filled during the copy."""
    with small_fs("8m") as fs:
        store = BlobStore(fs / "store")
        feed = tmp_path / "feed"
        os.mkfifo(feed)
        written: list[int] = []

        def writer() -> None:
            with feed.open("wb") as f:
                try:
                    for _ in range(64):
                        f.write(b"\x01" * (256 * 1024))
                        written.append(1)
                except BrokenPipeError:
                    pass  # the store stopped reading: what this test expects

        t = threading.Thread(target=writer)
        t.start()
        with pytest.raises(NoSpace, match=r"not enough space for the model in .*; nothing was "
                                          r"imported"):
            store.ingest(feed)
        t.join(30)
        assert 8 < len(written) < 64, "the copy stopped at the full disk, mid-way"
        assert list(store.tmp_dir.iterdir()) == [] and store.digests() == set()
        # The space came back with the part file: the next import works.
        small = tmp_path / "small.bin"
        small.write_bytes(b"x" * MiB)
        assert store.ingest(small).size == MiB


def test_an_import_that_does_not_fit_is_refused_while_the_daemon_serves(
    tmp_path: Path, smollm2_gguf: Path,
) -> None:
    with small_fs("160m") as fs:
        home = fs / "home"
        done = agent_cli(home, "models", "import", str(smollm2_gguf), "--alias", SMOL)
        assert done.returncode == 0, done.stderr
        big = make_tiny_gguf(tmp_path / "big.gguf", vocab_size=120_000, embedding_length=64)
        # The audit's own watermark is lowered: this test is about the import's refusal.
        with running(home, {"EDGE_AGENT_SECURITY__AUDIT_MIN_FREE_BYTES": str(MiB)}) as d:
            filler = fill(fs, leave=20 * MiB)
            assert big.stat().st_size > 25 * MiB
            done = agent_cli(home, "models", "import", str(big), "--alias", "big",
                             "--task", "completion")
            assert done.returncode == 1
            assert "not enough space for the model in" in done.stderr
            assert "nothing was imported" in done.stderr
            assert "Traceback" not in done.stderr
            listed = agent_cli(home, "models", "list", "--json")
            assert [m["alias"] for m in json.loads(listed.stdout)] == [SMOL]
            assert list((home / "store" / "tmp").iterdir()) == []
            with d.client() as c:
                r = c.post("/v1/chat/completions", json={
                    "model": SMOL, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}]})
                assert r.status_code == 200, r.text
            filler.unlink()
        with sqlite3.connect(home / "registry.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("SELECT COUNT(*) FROM models").fetchone() == (1,)
