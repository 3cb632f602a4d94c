"""registry.store: content-addressed ingest, dedupe, integrity, gc, and crash safety."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_models import file_mode, make_random_file, make_sparse_file

from registry.errors import IntegrityError, RegistryError
from registry.store import CHUNK_SIZE, Blob, BlobStore, hash_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def blob_files(store: BlobStore) -> list[Path]:
    return sorted(p for p in store.blobs_dir.rglob("*") if p.is_file())


def test_ingest_copies_into_a_sharded_path(store: BlobStore, tmp_path: Path) -> None:
    src = make_random_file(tmp_path / "m.gguf", 2 * CHUNK_SIZE + 10)
    data = src.read_bytes()
    calls: list[int] = []
    blob = store.ingest(src, progress=calls.append)
    sha = sha256_of(data)
    assert blob == Blob(sha, len(data), store.root / "blobs" / "sha256" / sha[:2] / sha)
    assert blob.path.read_bytes() == data
    assert src.exists()
    assert calls == [CHUNK_SIZE, CHUNK_SIZE, 10]
    assert store.exists(sha) and store.path(sha) == blob.path
    assert store.get(sha) == blob
    assert list(store.tmp_dir.iterdir()) == []


def test_identical_content_is_stored_once(store: BlobStore, tmp_path: Path) -> None:
    a = make_random_file(tmp_path / "a.gguf", 5000, seed=1)
    b = tmp_path / "b.gguf"
    b.write_bytes(a.read_bytes())
    first, second = store.ingest(a), store.ingest(b)
    assert first == second
    assert blob_files(store) == [first.path]
    assert list(store.tmp_dir.iterdir()) == []


def test_empty_file(store: BlobStore, tmp_path: Path) -> None:
    blob = store.ingest(make_random_file(tmp_path / "e", 0))
    assert blob.sha256 == sha256_of(b"") and blob.size == 0


def test_move_on_same_filesystem_renames(store: BlobStore, tmp_path: Path) -> None:
    src = make_random_file(tmp_path / "m.onnx", 3000)
    inode = src.stat().st_ino
    blob = store.ingest(src, move=True)
    assert not src.exists()
    assert blob.path.stat().st_ino == inode
    assert file_mode(blob.path) == 0o640


def test_move_of_known_content_deletes_the_source(store: BlobStore, tmp_path: Path) -> None:
    kept = store.ingest(make_random_file(tmp_path / "a", 3000))
    src = make_random_file(tmp_path / "b", 3000)
    assert store.ingest(src, move=True) == kept
    assert not src.exists()


def test_move_of_the_blob_itself_keeps_it(store: BlobStore, tmp_path: Path) -> None:
    blob = store.ingest(make_random_file(tmp_path / "a", 3000))
    assert store.ingest(blob.path, move=True) == blob
    assert blob.path.exists()


def test_move_across_filesystems_copies_then_deletes(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BlobStore, "_same_filesystem", lambda self, src: False)
    src = make_random_file(tmp_path / "m", 3000)
    data = src.read_bytes()
    blob = store.ingest(src, move=True)
    assert not src.exists()
    assert blob.path.read_bytes() == data


def test_expected_sha256_matches(store: BlobStore, tmp_path: Path) -> None:
    src = make_random_file(tmp_path / "m", 3000)
    sha = sha256_of(src.read_bytes())
    assert store.ingest(src, expected_sha256=sha.upper()).sha256 == sha


@pytest.mark.parametrize("move", [False, True])
def test_integrity_error_leaves_nothing_behind(
    store: BlobStore, tmp_path: Path, move: bool
) -> None:
    src = make_random_file(tmp_path / "m", CHUNK_SIZE + 1)
    with pytest.raises(IntegrityError, match=r"expected 0{64}") as info:
        store.ingest(src, move=move, expected_sha256="0" * 64)
    assert isinstance(info.value, RegistryError)
    assert blob_files(store) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert src.exists()  # a mismatching file is never consumed


def test_malformed_expected_sha256_is_refused_first(store: BlobStore, tmp_path: Path) -> None:
    src = make_random_file(tmp_path / "m", 100)
    with pytest.raises(ValueError, match="not a sha256"):
        store.ingest(src, expected_sha256="abc", move=True)
    assert src.exists()


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        "../" + "0" * 61,
        "0" * 64 + "\n",
        "/" + "0" * 63,
    ],
)
def test_digest_strings_are_checked_before_building_paths(store: BlobStore, bad: str) -> None:
    for method in (store.path, store.exists, store.get, store.remove):
        with pytest.raises(ValueError, match="not a sha256"):
            method(bad)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_modes_are_0640_files_and_0750_dirs(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store = BlobStore(tmp_path / "store")
        blob = store.ingest(make_random_file(tmp_path / "m", 100))
    finally:
        os.umask(old)
    assert file_mode(blob.path) == 0o640
    for d in (store.root, store.root / "blobs", store.blobs_dir, blob.path.parent, store.tmp_dir):
        assert file_mode(d) == 0o750, d


def test_remove(store: BlobStore, tmp_path: Path) -> None:
    blob = store.ingest(make_random_file(tmp_path / "m", 100))
    assert store.remove(blob.sha256) is True
    assert not store.exists(blob.sha256)
    assert store.remove(blob.sha256) is False


def test_gc_removes_only_unreferenced_blobs(store: BlobStore, tmp_path: Path) -> None:
    a, b, c = (store.ingest(make_random_file(tmp_path / f"f{i}", 100, seed=i)) for i in range(3))
    stray = a.path.parent / "not-a-blob"
    stray.write_bytes(b"keep me")
    assert store.gc({a.sha256}) == sorted([b.sha256, c.sha256])
    assert store.digests() == {a.sha256}
    assert stray.exists()
    assert store.gc({a.sha256}) == []


def test_cleanup_tmp_empties_tmp(store: BlobStore) -> None:
    (store.tmp_dir / "ingest-1.part").write_bytes(b"partial")
    (store.tmp_dir / "leftover").mkdir()
    (store.tmp_dir / "leftover" / "x").write_bytes(b"x")
    assert store.cleanup_tmp() == 2
    assert list(store.tmp_dir.iterdir()) == []


def test_hash_file(tmp_path: Path) -> None:
    src = make_random_file(tmp_path / "m", 2 * CHUNK_SIZE + CHUNK_SIZE // 2)
    seen: list[int] = []
    assert hash_file(src, seen.append) == (sha256_of(src.read_bytes()), src.stat().st_size)
    assert sum(seen) == src.stat().st_size
    assert hash_file(make_random_file(tmp_path / "e", 0)) == (sha256_of(b""), 0)


# A child that ingests `src`; after the first chunk is in the temp file it says so on
# stdout, then blocks on stdin (which the parent never writes) until it is killed.
CHILD = """
import sys
from pathlib import Path
from registry.store import BlobStore

def progress(n):
    sys.stdout.buffer.write(b"1")
    sys.stdout.flush()
    sys.stdin.buffer.read(1)

BlobStore(Path(sys.argv[1])).ingest(Path(sys.argv[2]), progress=progress)
"""


def test_sigkill_mid_ingest_leaves_no_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    src = make_sparse_file(tmp_path / "big.gguf", 200_000_000, head=b"GGUF unique 7d1f")
    sha, size = hash_file(src)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(src)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        started = child.stdout.read(1)  # blocks until the first chunk is written
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert started == b"1", child.stderr.read().decode()
    assert child.returncode == -signal.SIGKILL

    store = BlobStore(root)
    assert not store.exists(sha)
    assert blob_files(store) == []
    (partial,) = list(store.tmp_dir.iterdir())
    assert 0 < partial.stat().st_size < size

    assert store.cleanup_tmp() == 1
    assert list(store.tmp_dir.iterdir()) == []
    assert store.ingest(src, move=True).sha256 == sha  # and the store still works
