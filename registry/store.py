"""The content-addressed blob store: model files kept once each, named by their sha256.

Layout under `root`::

    blobs/sha256/<first 2 hex>/<64 hex>   the files (0640; directories 0750)
    tmp/                                  ingests in progress (same filesystem as blobs/)

A blob only ever appears complete: it is written and fsynced under `tmp/`, then renamed
into place. A process killed mid-ingest leaves a file in `tmp/` and nothing in `blobs/`.

One writer process at a time (the registry holds its lock around `ingest`, `remove`,
`gc` and `cleanup_tmp`); `cleanup_tmp()` deletes everything in `tmp/`, so it runs at
start-up under that lock, never while another process may be ingesting. Readers need
no lock: a path either names a complete blob or nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet.files import fsync_dir
from registry.errors import IntegrityError, NoSpace

__all__ = ["Blob", "BlobStore", "Progress", "check_sha256", "hash_file"]

CHUNK_SIZE = 1 << 20
FILE_MODE = 0o640
DIR_MODE = 0o750

# Called with the number of bytes handled since the last call (like tqdm's `update`).
Progress = Callable[[int], object]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    path: Path


def check_sha256(sha256: str) -> str:
    """Return `sha256` if it is 64 lowercase hex digits, else raise ValueError."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 digest (64 lowercase hex digits): {sha256!r}")
    return sha256


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
            if progress is not None:
                progress(n)
    return h.hexdigest(), size


class BlobStore:
    """Files stored by content under `root`; see the module docstring for the rules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        root.parent.mkdir(parents=True, exist_ok=True)
        _makedirs(root)
        _makedirs(root / "blobs")
        _makedirs(self.blobs_dir)
        _makedirs(self.tmp_dir)

    # -- reads -----------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        check_sha256(sha256)
        return self.blobs_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> Blob | None:
        path = self.path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return Blob(sha256, size, path)

    def digests(self) -> set[str]:
        """Digests of every blob in the store (files that are not blobs are ignored)."""
        found: set[str] = set()
        for shard in self.blobs_dir.iterdir():
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for entry in shard.iterdir():
                name = entry.name
                if _SHA256_RE.fullmatch(name) and name[:2] == shard.name and entry.is_file():
                    found.add(name)
        return found

    # -- writes (one writer process at a time) ---------------------------------------

    def ingest(
        self,
        src: Path,
        *,
        move: bool = False,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> Blob:
        """Store `src` by content and return its blob; storing the same content twice is
        a no-op that returns the existing blob.

        `move=True` renames `src` into the store when it is on the same filesystem (and
        deletes it once stored otherwise); `src` stays put if the digest does not match.
        """
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256.lower())
        if move and self._same_filesystem(src):
            return self._ingest_by_rename(src, expected_sha256, progress)
        blob = self._ingest_by_copy(src, expected_sha256, progress)
        if move and not _same_file(src, blob.path):
            src.unlink()
        return blob

    def remove(self, sha256: str) -> bool:
        """Delete a blob; False if there was none."""
        path = self.path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def gc(self, referenced: set[str]) -> list[str]:
        """Delete every blob whose digest is not in `referenced`; return their digests."""
        removed = sorted(self.digests() - referenced)
        for sha in removed:
            self.remove(sha)
        return removed

    def cleanup_tmp(self) -> int:
        """Delete everything under tmp/ (leftovers of killed ingests); return the count.

        Only safe while no other process is ingesting: call it under the registry lock.
        """
        count = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
            count += 1
        return count

    # -- internals -------------------------------------------------------------------

    def _same_filesystem(self, src: Path) -> bool:
        return src.stat().st_dev == self.blobs_dir.stat().st_dev

    def _ingest_by_copy(self, src: Path, expected: str | None, progress: Progress | None) -> Blob:
        need = src.stat().st_size
        free = shutil.disk_usage(self.tmp_dir).free
        if need > free:
            raise NoSpace(_no_space(self.root, need, free))
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="ingest-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            size = 0
            buf = bytearray(CHUNK_SIZE)
            view = memoryview(buf)
            with os.fdopen(fd, "wb", buffering=0) as fout, src.open("rb", buffering=0) as fin:
                while n := fin.readinto(buf):
                    chunk = view[:n]
                    h.update(chunk)
                    _write_all(fout.fileno(), chunk)
                    size += n
                    if progress is not None:
                        progress(n)
                os.fchmod(fout.fileno(), FILE_MODE)
                os.fsync(fout.fileno())
            sha = h.hexdigest()
            _check_expected(src, sha, expected)
            return self._commit(tmp, sha, size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Filled while copying (something else wrote too): the part file goes below.
            raise NoSpace(_no_space(self.root, need, shutil.disk_usage(self.tmp_dir).free)) \
                from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already once committed

    def _ingest_by_rename(self, src: Path, expected: str | None, progress: Progress | None) -> Blob:
        sha, size = hash_file(src, progress)
        _check_expected(src, sha, expected)
        existing = self.get(sha)
        if existing is not None:
            if not _same_file(src, existing.path):
                src.unlink()
            return existing
        # From the hash to the rename we trust that nobody else writes `src`.
        with src.open("rb") as f:
            try:
                os.fchmod(f.fileno(), FILE_MODE)
            except PermissionError:  # someone else's file: we may rename it but not own it
                blob = self._ingest_by_copy(src, sha, None)
                src.unlink()
                return blob
            os.fsync(f.fileno())
        return self._commit(src, sha, size)

    def _commit(self, file: Path, sha: str, size: int) -> Blob:
        """Rename a complete, fsynced file into place, unless that content is already here."""
        existing = self.get(sha)
        if existing is not None:
            return existing
        dest = self.path(sha)
        if not dest.parent.is_dir():
            _makedirs(dest.parent)
            fsync_dir(dest.parent.parent)
        file.replace(dest)
        fsync_dir(dest.parent)
        return Blob(sha, size, dest)


def _no_space(root: Path, need: int, free: int) -> str:
    return (f"not enough space for the model in {root}: it needs {need / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free; nothing was imported")


def _check_expected(src: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{src} has sha256 {actual}, expected {expected}: the file is corrupt or not "
            "the one expected; fetch it again"
        )


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _makedirs(path: Path) -> None:
    """Create `path` with mode 0750 (not umask-dependent); an existing directory is kept."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    path.chmod(DIR_MODE)


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return a.samefile(b)
    return False
