"""Small real file systems for disk-full tests: a tmpfs of a given size, and a filler that
leaves a chosen number of bytes free. Mounting needs root (as CI runs); without it the test
is skipped with that reason."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_fs(size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (the test runs as root in CI), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the suite as root)")
    mnt = Path(tempfile.mkdtemp(prefix="ea-fs-", dir="/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `directory` until only about `leave` bytes are free."""
    filler = directory / "filler"
    chunk = b"\0" * (64 * 1024)
    try:
        f = filler.open("wb")
    except OSError:
        return filler  # full already (a download under test got there first): done
    with f:
        try:
            while True:
                st = os.statvfs(directory)
                room = st.f_bavail * st.f_frsize - leave
                if room <= 0:
                    break
                f.write(chunk[:room] if room < len(chunk) else chunk)
                f.flush()
        except OSError:
            pass  # ENOSPC: full
    return filler
